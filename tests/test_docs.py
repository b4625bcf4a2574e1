"""harness.docs: the supported-models table in each format, its footnotes, and the --check gate."""
from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import pytest

from harness.docs import BACKEND_MARK, MARKS, build_document, register_docs_cli, render
from harness.matrix import Matrix, RunInfo, build_matrix, write_matrix_json
from harness.results import ResultRecord


def record(model: str, architecture: str, tier: str, outcome: str, reason: str = "",
           task: str | None = "generate") -> ResultRecord:
    return ResultRecord(model=model, architecture=architecture, task=task, tier=tier, check="c", outcome=outcome,
                        reason=reason)


RECORDS = [
    record("tiny-llama", "LlamaForCausalLM", "smoke", "pass"),
    record("tiny-llama", "LlamaForCausalLM", "strict", "fail", "token 3 differs"),
    record("tiny-llama", "LlamaForCausalLM", "sensibility", "skip", "untrained synthetic weights"),
    record("tiny-mistral", "MistralForCausalLM", "smoke", "error", "worker crashed"),
    record("tiny-mistral", "MistralForCausalLM", "sensibility", "skip", "untrained synthetic weights"),
    record("bert", "BertModel", "strict", "skip", "needs remote code", task="embed"),
    record("tiny-qwen3", "Qwen3ForCausalLM", "smoke", "pass"),  # not in vLLM's lists
    record("llava", "LlavaForConditionalGeneration", "smoke", "pass"),
]


def matrix_of(records: list[ResultRecord]) -> Matrix:
    return build_matrix(records, RunInfo.for_records("run-1", "start", "end", records))


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    return matrix_of(RECORDS)


def markdown_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| `")]


def test_markdown_has_every_row_once(matrix):
    rows = markdown_rows(render(matrix, "markdown"))
    assert len(rows) == len(matrix.rows)
    assert sum(1 for r in rows if r.startswith("| `LlamaForCausalLM` |")) == 3  # generate, embed, reward rows


def test_myst_and_html_have_every_row_once(matrix):
    myst = render(matrix, "myst")
    assert len(re.findall(r"^\* - `", myst, flags=re.M)) == len(matrix.rows)
    assert myst.count(":::{list-table}") == len(re.findall(r"^:::$", myst, flags=re.M)) == 8  # opened, closed
    page = render(matrix, "html")
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r"<tr><td><code>", page)) == len(matrix.rows)


def test_status_marks_and_deduplicated_numbered_footnotes(matrix):
    text = render(matrix, "markdown")
    llama = markdown_rows(text)[[r.split(" | ")[0] for r in markdown_rows(text)].index("| `LlamaForCausalLM`")]
    assert llama.endswith(f"| {MARKS['pass']} | ❌ | ⚠️[^1] | — |")
    mistral = next(r for r in markdown_rows(text) if r.startswith("| `MistralForCausalLM` |"))
    assert mistral.endswith("| ❌ | — | ⚠️[^1] | — |")  # error shows as ❌; the same reason, the same note
    bert = next(r for r in markdown_rows(text) if r.startswith("| `BertModel` |"))
    assert bert.endswith("| — | ⚠️[^2] | — | — |")
    notes = re.findall(r"^\[\^(\d+)\]: (.*)$", text, flags=re.M)
    assert notes == [("1", "untrained synthetic weights"), ("2", "needs remote code")]


def test_rows_run_only_through_the_transformers_backend_are_marked():
    records = [
        ResultRecord(model="tiny-arcee", architecture="ArceeForCausalLM", task="generate", tier="strict", check="c",
                     outcome="pass", model_impl="transformers"),
        *(ResultRecord(model="tiny-llama", architecture="LlamaForCausalLM", task="generate", tier="strict",
                       check=check, outcome="pass", model_impl=impl)
          for check, impl in (("c", "native"), ("d", "transformers"))),
    ]
    # Refused by the backend: a skip, nothing ran.
    records.append(ResultRecord(model="tiny-mamba", architecture="MambaForCausalLM", task="generate", tier="smoke",
                                check="c", outcome="skip", reason="no attention layers", model_impl="transformers"))
    matrix = matrix_of(records)
    rows = markdown_rows(render(matrix, "markdown"))
    assert sum(r.startswith(f"| `ArceeForCausalLM`{BACKEND_MARK} |") for r in rows) == 1
    assert sum(r.startswith("| `MambaForCausalLM` |") for r in rows) == 1
    # Checked natively too: not marked.
    assert sum(r.startswith("| `LlamaForCausalLM` |") for r in rows) == 3
    assert f"<code>ArceeForCausalLM</code>{BACKEND_MARK}</td>" in render(matrix, "html")


def test_html_footnotes_link_to_the_reason(matrix):
    page = render(matrix, "html")
    assert '<sup><a href="#note-1">1</a></sup>' in page
    assert '<li id="note-2">needs remote code</li>' in page


def test_sections_follow_vllms_pages_and_only_multimodal_tables_have_inputs(matrix):
    text = render(matrix, "markdown")
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[1:] == [
        "## Text-only Language Models", "### Generative Models", "#### Text Generation",
        "### Pooling Models", "#### Text Embedding", "#### Reward Modeling", "#### Classification",
        "#### Sentence Pair Scoring",
        "## Multimodal Language Models", "### Generative Models", "#### Text Generation",
        "### Pooling Models", "#### Text Embedding",
        "## Other Architectures",
    ]
    headers = [line for line in text.splitlines() if line.startswith("| Architecture |")]
    assert headers[0] == "| Architecture | Models | Example HF Models | Smoke | Strict | Sensibility | Community |"
    assert [("Inputs" in h) for h in headers] == [False] * 5 + [True] * 2 + [False]
    llava = next(r for r in markdown_rows(text) if r.startswith("| `LlavaForConditionalGeneration` |"))
    assert "| T + IE+ |" in llava
    assert "| `Qwen3ForCausalLM` |" in text.split("## Other Architectures")[1]


def test_rendering_is_deterministic_whatever_the_record_order():
    shuffled = list(RECORDS)
    random.Random(0).shuffle(shuffled)
    for fmt in ("markdown", "myst", "html"):
        assert render(matrix_of(RECORDS), fmt) == render(matrix_of(shuffled), fmt)


def test_no_record_leaves_the_table_with_every_row_untested():
    matrix = matrix_of([])
    document = build_document(matrix)
    assert sum(len(t.rows) for t in document.tables) == len(matrix.rows)
    assert {c.status for t in document.tables for r in t.rows for c in r.statuses} == {"untested"}
    assert document.footnotes == ()


# --------------------------------------------------------------------------- CLI and --check

def run_docs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="litmus")
    register_docs_cli(parser.add_subparsers())
    args = parser.parse_args(["docs", *argv])
    return args.run(args)


@pytest.fixture
def reports(tmp_path, matrix) -> Path:
    """A reports dir whose latest run holds the matrix."""
    run = tmp_path / "reports" / "run-1"
    run.mkdir(parents=True)
    write_matrix_json(matrix, run / "matrix.json")
    (tmp_path / "reports" / "latest").symlink_to("run-1")
    return tmp_path / "reports"


@pytest.mark.parametrize("fmt", ["markdown", "myst", "html"])
def test_cli_renders_the_latest_matrix_by_default(reports, matrix, fmt):
    out = reports / f"table.{fmt}"
    assert run_docs(["--reports-dir", str(reports), "--format", fmt, "--output", str(out)]) == 0
    assert out.read_text() == render(matrix, fmt)


def test_check_passes_on_a_fresh_table_and_fails_with_a_diff_after_an_edit(reports, capsys):
    committed = reports / "supported_models.md"
    assert run_docs(["--reports-dir", str(reports), "--output", str(committed)]) == 0
    assert run_docs(["--reports-dir", str(reports), "--check"]) == 0

    committed.write_text(committed.read_text().replace("| `BertModel` | BERT-based", "| `BertModel` | BERT"))
    capsys.readouterr()
    assert run_docs(["--check", "--matrix", str(reports / "run-1" / "matrix.json"), "--reports-dir",
                     str(reports)]) == 1
    captured = capsys.readouterr()
    assert "-| `BertModel` | BERT |" in captured.out and "+| `BertModel` | BERT-based |" in captured.out
    assert "is stale" in captured.err


def test_check_fails_when_there_is_no_committed_table(reports, capsys):
    assert run_docs(["--reports-dir", str(reports), "--check"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_committed_table_is_what_the_committed_matrix_renders():
    """The stale-table gate in the default run: a change to the renderer, the registry or the
    latest matrix run needs `litmus docs` re-run and its table committed."""
    reports = Path(__file__).resolve().parents[1] / "reports"
    if not (reports / "latest").exists():
        pytest.skip("no matrix run is committed (reports/latest): nothing to check the table against")
    assert run_docs(["--reports-dir", str(reports), "--check"]) == 0
