"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) around AsyncLLMEngine."""
