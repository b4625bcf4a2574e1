"""Ways to run the engine other than the offline LLM API: the OpenAI-compatible server and its CLI."""
