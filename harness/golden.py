"""The strict tier's reference outputs: computed by Transformers now, or read from a golden file.

A golden file (golden/<model>.json) holds what Transformers produced for the example prompts
(greedy tokens, their top-k logprobs, prompt logprobs) together with the provenance that made
it: library versions, hashes of the weights, config and tokenizer, the prompts, the settings.
`--reference golden` compares the engine with it instead of loading Transformers; once its
provenance no longer matches the model and harness at hand the file is stale, and says why.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from harness.runners import HfRunner, PromptTopLogprobs, TokensPromptLogprobs, TokensTextLogprobs, torch_threads
from harness.zoo.store import file_sha256

GOLDEN_FORMAT = 1
# 1e-5 sits 100x below the comparators' tolerance and hides the last-bit noise that would
# make every re-recording a diff.
LOGPROB_DECIMALS = 5
# Above this a golden file is stored gzipped; the example prompts on small vocabularies stay
# plain JSON, which reviews as a diff.
GZIP_ABOVE_BYTES = 256 * 1024
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")


class GoldenError(Exception):
    """A golden file that cannot be read, or a model whose provenance cannot be taken."""


@dataclass(frozen=True)
class ReferenceSettings:
    """How the reference was produced; a golden file recorded otherwise does not apply."""

    max_tokens: int = 32
    num_logprobs: int = 5
    num_prompt_logprobs: int = 5
    dtype: str = "float32"


@dataclass
class ReferenceOutputs:
    """What the strict tests compare the engine with, one entry per example prompt."""

    generations: list[TokensTextLogprobs]
    prompt_logprobs: list[TokensPromptLogprobs]
    eos_token_ids: list[int]


def run_hf_reference(hf: HfRunner, prompts: Sequence[str], settings: ReferenceSettings) -> ReferenceOutputs:
    return ReferenceOutputs(
        generations=hf.generate_greedy_logprobs(prompts, settings.max_tokens, settings.num_logprobs),
        prompt_logprobs=hf.prompt_logprobs(prompts, settings.num_prompt_logprobs),
        eos_token_ids=list(hf.eos_token_ids),
    )


@dataclass
class Provenance:
    transformers: str
    torch: str
    weights_sha256: dict[str, str]
    config_sha256: str
    tokenizer_sha256: str
    prompts: list[str]
    settings: dict[str, Any]

    @classmethod
    def of(cls, model_path: str | Path, prompts: Sequence[str], settings: ReferenceSettings) -> Provenance:
        path = Path(model_path)
        directory = path if path.is_dir() else path.parent
        return cls(
            transformers=transformers.__version__,
            torch=torch.__version__,
            weights_sha256=_weight_hashes(path),
            config_sha256=_files_sha256(directory, CONFIG_FILES),
            tokenizer_sha256=_files_sha256(directory, TOKENIZER_FILES),
            prompts=list(prompts),
            settings=asdict(settings),
        )

    def stale_reasons(self, current: Provenance) -> list[str]:
        """Why a reference recorded under `self` does not hold for `current`; empty when it does."""
        reasons = [
            f"{library} major version changed: {recorded} recorded, {now} now"
            for library, recorded, now in (
                ("transformers", self.transformers, current.transformers),
                ("torch", self.torch, current.torch),
            )
            if _major(recorded) != _major(now)
        ]
        reasons += _weights_reasons(self.weights_sha256, current.weights_sha256)
        if self.config_sha256 != current.config_sha256:
            reasons.append(f"config changed ({', '.join(CONFIG_FILES)})")
        if self.tokenizer_sha256 != current.tokenizer_sha256:
            reasons.append("tokenizer files changed")
        reasons += _prompts_reasons(self.prompts, current.prompts)
        changed = [
            f"{name} {self.settings.get(name)!r} recorded, {value!r} now"
            for name, value in current.settings.items()
            if self.settings.get(name) != value
        ]
        if changed:
            reasons.append("settings changed: " + ", ".join(changed))
        return reasons


@dataclass
class GoldenFile:
    model: str
    provenance: Provenance
    reference: ReferenceOutputs


@dataclass
class GoldenStatus:
    model: str
    path: Path
    state: Literal["fresh", "stale", "missing", "unreadable"]
    reasons: list[str] = field(default_factory=list)
    golden: GoldenFile | None = None

    def describe(self) -> str:
        return self.state + (": " + "; ".join(self.reasons) if self.reasons else "")


def default_golden_dir(root: Path | None = None) -> Path:
    """$LITMUS_GOLDEN_DIR, else golden/ under `root` (the repository) or the working directory."""
    given = os.environ.get("LITMUS_GOLDEN_DIR")
    return Path(given) if given else (root or Path.cwd()) / "golden"


def golden_path(directory: Path, model: str) -> Path:
    """The model's golden file in `directory`: the gzipped one if that is what exists."""
    plain, zipped = _golden_paths(directory, model)
    return zipped if zipped.exists() and not plain.exists() else plain


def _golden_paths(directory: Path, model: str) -> tuple[Path, Path]:
    # A hub id or a path becomes one file name: org/name -> org--name.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "--", model).strip("-.") or "model"
    plain = Path(directory) / f"{stem}.json"
    return plain, plain.with_name(plain.name + ".gz")


def record_golden(
    model: str, model_path: str, directory: Path, prompts: Sequence[str], settings: ReferenceSettings
) -> Path:
    provenance = Provenance.of(model_path, prompts, settings)
    # One thread: a different split of the matmuls changes the last bits, and so the file.
    with torch_threads(1), HfRunner(model_path, dtype=getattr(torch, settings.dtype)) as hf:
        reference = run_hf_reference(hf, prompts, settings)
    return save_golden(GoldenFile(model, provenance, reference), directory)


def save_golden(golden: GoldenFile, directory: Path, gzip_above: int = GZIP_ABOVE_BYTES) -> Path:
    data = _encode(golden).encode()
    plain, zipped = _golden_paths(directory, golden.model)
    target, other = (zipped, plain) if len(data) > gzip_above else (plain, zipped)
    if target is zipped:
        # mtime=0: the same outputs give the same bytes, so re-recording shows no change.
        data = gzip.compress(data, mtime=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    other.unlink(missing_ok=True)
    return target


def load_golden(path: Path) -> GoldenFile:
    try:
        raw = path.read_bytes()
        data = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    except (OSError, ValueError, EOFError) as exc:
        raise GoldenError(f"{path}: cannot be read as a golden file: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != GOLDEN_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise GoldenError(f"{path}: golden format {found!r}, this harness reads format {GOLDEN_FORMAT}")
    try:
        return _decode(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise GoldenError(f"{path}: malformed golden file ({type(exc).__name__}: {exc})") from None


def golden_status(
    directory: Path,
    model: str,
    prompts: Sequence[str],
    settings: ReferenceSettings,
    model_path: str | None = None,
) -> GoldenStatus:
    """Whether the model's golden file can stand in for Transformers here and now.

    Without `model_path` the model is resolved (a zoo model built if needed) once its file
    has been read."""
    path = golden_path(directory, model)
    if not path.exists():
        return GoldenStatus(model, path, "missing", [f"no golden file {path}"])
    try:
        golden = load_golden(path)
    except GoldenError as exc:
        return GoldenStatus(model, path, "unreadable", [str(exc)])
    try:
        current = Provenance.of(model_path or _model_path(model, GoldenError), prompts, settings)
    except (GoldenError, OSError) as exc:
        return GoldenStatus(model, path, "stale", [f"the model's provenance cannot be taken: {exc}"], golden)
    reasons = golden.provenance.stale_reasons(current)
    return GoldenStatus(model, path, "stale" if reasons else "fresh", reasons, golden)


# --- provenance ------------------------------------------------------------------------------


def _weight_hashes(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: file_sha256(path)}
    for pattern in WEIGHT_PATTERNS:
        files = sorted(path.glob(pattern))
        if files:
            return {file.name: file_sha256(file) for file in files}
    raise GoldenError(f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {path}")


def _files_sha256(directory: Path, names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        file = directory / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + _canonical_bytes(file) + b"\0")
    return digest.hexdigest()


def _canonical_bytes(file: Path) -> bytes:
    """JSON without the writer's transformers_version: a zoo rebuilt under a newer
    transformers holds the same model (a major version change is caught on its own)."""
    if file.suffix != ".json":
        return file.read_bytes()
    data = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data.pop("transformers_version", None)
    return json.dumps(data, sort_keys=True).encode()


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def _weights_reasons(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    if recorded.keys() != current.keys():
        return [f"weight files changed: {sorted(recorded)} recorded, {sorted(current)} now"]
    return [
        f"weights changed: {name} sha256 {recorded[name][:12]} recorded, {current[name][:12]} now"
        for name in sorted(recorded)
        if recorded[name] != current[name]
    ]


def _prompts_reasons(recorded: list[str], current: list[str]) -> list[str]:
    if len(recorded) != len(current):
        return [f"prompts changed: {len(recorded)} recorded, {len(current)} now"]
    differ = [index for index, (a, b) in enumerate(zip(recorded, current)) if a != b]
    return [f"prompts changed: prompt {', '.join(map(str, differ))} differ"] if differ else []


# --- file format -----------------------------------------------------------------------------


def _encode(golden: GoldenFile) -> str:
    """Compact JSON with one prompt's output per line, so a re-recording diffs by prompt."""
    ref = golden.reference
    generations = [
        {"token_ids": ids, "text": text, "logprobs": [_encode_step(step) for step in top]}
        for ids, text, top in ref.generations
    ]
    prompt_logprobs = [
        {"prompt_token_ids": ids, "logprobs": [_encode_step(step) for step in steps]}
        for ids, steps in ref.prompt_logprobs
    ]
    head = {"format": GOLDEN_FORMAT, "model": golden.model, "provenance": asdict(golden.provenance),
            "eos_token_ids": ref.eos_token_ids}
    lines = [f"{json.dumps(key)}: {_compact(value)}" for key, value in head.items()]
    for key, items in (("generations", generations), ("prompt_logprobs", prompt_logprobs)):
        lines.append(f"{json.dumps(key)}: [\n" + ",\n".join(map(_compact, items)) + "\n]")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _encode_step(step: dict[int, float] | None) -> list[list[float]] | None:
    return None if step is None else [[token, round(logprob, LOGPROB_DECIMALS)] for token, logprob in step.items()]


def _decode(data: dict[str, Any]) -> GoldenFile:
    generations = [
        (list(item["token_ids"]), str(item["text"]), [_decode_step(step) for step in item["logprobs"]])
        for item in data["generations"]
    ]
    prompt_logprobs: list[TokensPromptLogprobs] = [
        (list(item["prompt_token_ids"]), _decode_steps(item["logprobs"])) for item in data["prompt_logprobs"]
    ]
    reference = ReferenceOutputs(generations, prompt_logprobs, list(data["eos_token_ids"]))
    return GoldenFile(str(data["model"]), Provenance(**data["provenance"]), reference)


def _decode_steps(steps: list[Any]) -> PromptTopLogprobs:
    return [None if step is None else _decode_step(step) for step in steps]


def _decode_step(step: list[list[float]]) -> dict[int, float]:
    return {int(token): float(logprob) for token, logprob in step}


# --- the `litmus golden` command -------------------------------------------------------------


def register_golden_cli(commands: argparse._SubParsersAction) -> None:
    golden = commands.add_parser("golden", help="recorded Transformers reference outputs (golden/)")
    actions = golden.add_subparsers(title="golden commands", metavar="ACTION", required=True)
    record = actions.add_parser("record", help="run Transformers on the example prompts and store the outputs")
    record.add_argument("--model", action="append", default=[], metavar="NAME|PATH",
                        help="zoo name, local HF directory or cached hub id (repeatable)")
    record.add_argument("--zoo", action="store_true", help="every generation model of the zoo")
    record.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="directory of golden files (default: $LITMUS_GOLDEN_DIR, else ./golden)")
    record.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    record.set_defaults(run=_record)
    check = actions.add_parser("check", help="list every golden file as fresh / stale (with why) / unreadable")
    check.add_argument("--dir", type=Path, default=None, metavar="DIR",
                       help="directory of golden files (default: $LITMUS_GOLDEN_DIR, else ./golden)")
    check.add_argument("--model", action="append", default=[], metavar="NAME|PATH",
                       help="check only these models (a model without a file is reported missing)")
    check.set_defaults(run=_check)


def _record(args: argparse.Namespace) -> int:
    from harness.cli import CommandError
    from harness.plugin import EXAMPLE_PROMPTS
    from harness.zoo import list_specs

    zoo = [spec.name for spec in list_specs() if spec.task == "generate"] if args.zoo else []
    models = list(dict.fromkeys(args.model + zoo))
    if not models:
        raise CommandError("name a model with --model (or --zoo for every zoo model)")
    directory = args.out or default_golden_dir()
    settings = ReferenceSettings(dtype=args.dtype)
    for model in models:
        path = _model_path(model, CommandError)
        written = record_golden(model, path, directory, EXAMPLE_PROMPTS, settings)
        print(f"{model}: {written} ({written.stat().st_size / 1024:.1f} KiB)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from harness.plugin import EXAMPLE_PROMPTS

    directory = args.dir or default_golden_dir()
    models = args.model or _recorded_models(directory)
    if not models:
        print(f"no golden files in {directory}")
        return 0
    statuses = [golden_status(directory, model, EXAMPLE_PROMPTS, ReferenceSettings()) for model in models]
    width = max(len(status.model) for status in statuses)
    for status in statuses:
        print(f"{status.model:<{width}}  {status.describe()}")
    fresh = sum(status.state == "fresh" for status in statuses)
    print(f"{fresh} of {len(statuses)} golden files fresh")
    return 0 if fresh == len(statuses) else 1


def _recorded_models(directory: Path) -> list[str]:
    """The models of the golden files in `directory` (an unreadable one under its file name)."""
    models = []
    for path in sorted([*directory.glob("*.json"), *directory.glob("*.json.gz")]):
        try:
            models.append(load_golden(path).model)
        except GoldenError:
            models.append(path.name.removesuffix(".gz").removesuffix(".json"))
    return models


def _model_path(model: str, error: type[Exception]) -> str:
    """The model's HF directory (building a zoo model if needed), refused unless it generates."""
    from engine.loader import ModelNotFoundError
    from harness.zoo import UnknownModelError, ZooUnavailableError, describe

    try:
        # Scripts read this command's stdout; a zoo build's chatter goes to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            info = describe(model, build=True)
    except (ModelNotFoundError, UnknownModelError, ZooUnavailableError) as exc:
        raise error(f"{model}: {exc}") from None
    if info.task != "generate":
        raise error(f"{model} is a pooling model (task {info.task!r}); golden files hold generations")
    return str(info.path)
