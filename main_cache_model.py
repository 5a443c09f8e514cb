#!/usr/bin/env python
"""Step 1 of EWQ: analyse a checkpoint's blocks (streaming, CPU only) and write a quantization plan.

The last line of stdout is the path of the plan JSON."""

import sys

import torch

from ewq.allocate import GRANULARITIES
from ewq.backends import BACKENDS, GROUP_SIZES
from ewq.backends.llamacpp import parse_formats
from ewq.common import ArgumentParser, EWQError, run_cli
from ewq.entropy import ENTROPY_KINDS, HIST_BINS
from ewq.plan import format_summary
from ewq.planning import METHODS, make_plan
from ewq.sensitivity import SWEEPS
from ewq.source import DEFAULT_MODEL, DEFAULT_MODELS_DIR, ENCODER_MODEL


def nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(text) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(text)
    return value


nonnegative_float.__name__ = "non-negative number"


def positive_float(text):
    value = nonnegative_float(text)
    if value == 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def parse_args(argv):
    p = ArgumentParser(prog="main_cache_model.py", description=__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local directory (config.json + *.safetensors), Hugging Face id, '{DEFAULT_MODEL}' "
                        f"(the embedded SmolLM2-135M-Instruct; default) or '{ENCODER_MODEL}' (the embedded encoder)")
    p.add_argument("--method", choices=METHODS, default="entropy",
                   help="entropy (default): the mu/sigma rule on block entropy, or lowest entropy lowered first under a "
                        "size target (always so with --backend llama.cpp); sensitivity: measure the damage of each "
                        "block (or matrix) alone in each format of the backend (decoders: KL to the original; "
                        "encoders: 1 - cosine of embeddings), then the exact minimum-damage plan for the size; "
                        "position: llama.cpp's rule, first and last blocks keep most bits. sensitivity and position "
                        "default to the size of the entropy rule's plan")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--target-bits", type=positive_float, default=None,
                      help="average bits per weight over the planned matrices: the blocks', and with --backend "
                           "llama.cpp the embeddings and output head too (raw: the run dtype's 16 bits, 32 where "
                           "benchmark.py runs float32: encoders on the CPU, torch-dynamic; 8-bit ~8, Q8_0 8.5; "
                           "4-bit ~4.5)")
    size.add_argument("--max-weight-gb", type=positive_float, default=None,
                      help="whole-model weight size in GB. What the plan does not quantize counts in the run dtype "
                           "(16-bit; 32-bit where benchmark.py runs float32: encoders on the CPU, torch-dynamic): "
                           "norms and biases always, embeddings and lm_head with the torch executors; with "
                           "--backend llama.cpp the embeddings and lm_head are planned (quantized) too")
    size.add_argument("--target", default=None, metavar="PRESET",
                      help="--backend llama.cpp: a llama-quantize preset name (Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, "
                           "Q3_K_M, Q2_K, ...): the GGUF EWQ writes is no larger than the file that preset gives this "
                           "checkpoint (computed from llama-quantize's own per-tensor rules and fallbacks, header and "
                           "padding included; llama.cpp is not run)")
    size.add_argument("--target-bpw", type=positive_float, default=None, metavar="B",
                      help="--backend llama.cpp: bits per weight in llama.cpp's sense, as llama-quantize prints it: "
                           "the bytes of all the file's tensors x 8 / all their elements, norms included")
    p.add_argument("--calib-tokens", type=int, default=None,
                   help="decoders, --method sensitivity: tokens of calibration text (default 512), from the end of the corpus")
    p.add_argument("--calib-sentences", type=int, default=None,
                   help="encoders, --method sensitivity: calibration sentences from the end of the corpus (default 128); "
                        "damage = mean 1 - cosine of their embeddings to the original's")
    p.add_argument("--calib-text", default=None, help="UTF-8 text file for calibration (default: lee_background.cor from gensim)")
    p.add_argument("--granularity", choices=GRANULARITIES, default="block",
                   help="block (default): one precision per transformer block; matrix: one per weight matrix "
                        "(e.g. q/k/v/o, gate/up/down), written as per-matrix entries in the plan; needs a method that "
                        "allocates (sensitivity, position, or entropy, which then lowers the lowest-entropy matrices first)")
    p.add_argument("--backend", choices=BACKENDS, default="bitsandbytes",
                   help="the executor that will run the plan: it sets what a raw weight costs (its run dtype) and "
                        "what --method sensitivity measures with; use the one you will benchmark (bitsandbytes: "
                        "LLM.int8 + nf4/fp4; torchao: weight-only int8 + int4 HQQ; torch-dynamic: int8 only, so only "
                        "--method sensitivity keeps to 8-bit, the other methods may choose 4-bit, which it refuses "
                        "to run; llama.cpp: its own formats Q8_0 to Q2_K and IQ4_NL/IQ4_XS with their exact "
                        "rounding, for every method, embeddings and output head planned too: the plan names ggml "
                        "types, for benchmark.py --backend llama.cpp or python -m ewq.export gguf)")
    p.add_argument("--formats", default=None,
                   help="--backend llama.cpp: the ggml types a plan chooses from, comma-separated (default "
                        "Q8_0,Q6_K,Q5_K,Q4_K,Q5_0,Q4_0,IQ4_NL,IQ4_XS,Q3_K,Q2_K, each only where a matrix's rows are "
                        "whole blocks of it, and for a sensitivity plan Q5_1,Q4_1 unless the weights sit on a Q4_1 grid, "
                        "as the embedded SmolLM2's do (they went through GGUF Q4_1: those formats re-find it); on that model Q4_K/Q5_K, with a minimum per 32, can partly too: "
                        "Q8_0,Q6_K,Q5_0,Q4_0 keeps only symmetric formats; IQ3_XXS and IQ3_S, the 3-bit i-quants, "
                        "join the default only with --target IQ3_*/IQ2_*/IQ1_*, and IQ2_XS (2.31 bits, rounded only "
                        "with an importance matrix, never for the embeddings) with --target IQ2_*/IQ1_*: they take "
                        "~5-7 us per weight to emulate in the sweep and decode more slowly than Q4_0 on CPU; name "
                        "them to offer them elsewhere)")
    p.add_argument("--speed", default="preset", metavar="preset|F|any",
                   help="--method sensitivity with --target PRESET: preset (default), the GGUF also decodes no slower "
                        "than the preset's, by llama.cpp's CPU kernel time per weight of each format (a built-in "
                        "table measured on a CPU like this one: AVX2, or AVX-512 + AMX); a number F, at least F x the preset's speed; any: "
                        "the size is the only limit (slower formats such as Q5_0 may then buy quality)")
    p.add_argument("--decode-cost", default=None, metavar="FILE",
                   help="with --target PRESET: time --speed by the kernel costs measured on the CPU the GGUF will run "
                        "on (the decode_cost.json of python bench/decode_cost.py there) instead of the built-in table "
                        "chosen by this CPU's flags")
    imatrix = p.add_mutually_exclusive_group()
    imatrix.add_argument("--imatrix", default=None, metavar="FILE",
                         help="--backend llama.cpp: weight the rounding with this llama.cpp importance matrix "
                              "(llama-imatrix's GGUF or legacy .dat), as llama-quantize --imatrix does (default: EWQ's "
                              "own, the mean squared input of each matrix's columns on the calibration text, written "
                              "beside the sensitivity cache as a GGUF imatrix; one extra forward pass)")
    imatrix.add_argument("--no-imatrix", action="store_true",
                         help="--backend llama.cpp: plain rounding (llama-quantize without --imatrix)")
    p.add_argument("--sweep", choices=SWEEPS, default="fast",
                   help="decoders, --method sensitivity: fast (default): every item's KL estimated to second order from "
                        "one forward and a few backward passes (Fisher information of the output, sampled; a block item "
                        "from its block's output, a matrix from its layer's); exact: every item and format run through "
                        "the rest of the model (slow: minutes per hundred items). Whole-plan checks are always measured "
                        "exactly. Either way the model is read one block at a time from the checkpoint (memory: about "
                        "one float block plus the calibration state, whatever the model's size), and an interrupted "
                        "sweep resumes where it stopped")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="--method sensitivity: where the sweep runs (default cpu, float32). cuda: blocks stream onto the "
                        "GPU one at a time (fp16/bf16), so a model larger than the GPU sweeps as long as one block fits; "
                        "the measured numbers depend on the device, so they are cached per device type")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=64,
                   help="--backend torchao: int4 weights per scale/zero-point group (default 64; 32/64/128 on the "
                        "CPU; the other executors' 4-bit uses groups of 64, llama.cpp's its formats' own). Sizes in "
                        "the plan count 4 bytes per group. Careful: the embedded SmolLM2 went through GGUF Q4_1 (groups "
                        "of 32, float zero points), so any 32-group 4-bit format re-finds that grid and looks "
                        "near-lossless on it: draw no conclusion from --group-size 32 on that model")
    p.add_argument("--int8-activations", action="store_true",
                   help="torchao: measure 8-bit as int8 weights and int8 activations per token (Int8DynamicActivation"
                        "Int8WeightConfig) instead of weight-only; benchmark.py then runs the plan the same way")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4",
                   help="--backend bitsandbytes: the 4-bit type --method sensitivity measures (the other executors do "
                        "not read it)")
    p.add_argument("--entropy", choices=ENTROPY_KINDS, default="histogram",
                   help="histogram: the PoC's 128-bin Shannon entropy in bits (default); "
                        "softmax: the paper's entropy of softmax(weights), normalised by ln(n)")
    p.add_argument("--k", type=nonnegative_float, default=1.0,
                   help="the entropy rule: blocks with entropy below mu - k*sigma get 4-bit, below mu 8-bit, others "
                        "stay raw (default 1.0). Where the plan is allocated instead (a size target, --granularity "
                        "matrix, --method sensitivity or position, --backend llama.cpp) the rule's plan only sets the "
                        "default size")
    p.add_argument("--write-hf-config", nargs="?", const="cpu", choices=("cpu", "cuda"), default=None,
                   help="torch plans (8-bit/4-bit entries; a llama.cpp plan's ggml types are refused): also write "
                        "<plan>.quantization_config.json beside the plan: the plan as transformers' "
                        "TorchAoConfig (one torchao config per quantized weight), for from_pretrained(base, "
                        "quantization_config=TorchAoConfig.from_dict(json.load(...))) in your own code; the same model "
                        "as benchmark.py --backend torchao. cpu (default) or cuda: int4 has a different kernel on each. "
                        "CPU int4 configs parse after `import ewq.hf` (see README)")
    p.add_argument("--force", action="store_true", help="rewrite the plan even if one exists for the same weights and settings")
    p.add_argument("--models-dir", default=str(DEFAULT_MODELS_DIR), help="where fetched/converted models live (default models/)")
    p.add_argument("--out-dir", default="quantized_models", help="where the plan is written (default quantized_models/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EWQError("--device cuda: no CUDA GPU is visible to torch here; drop --device or run on a GPU machine")
    if args.calib_tokens is not None and args.calib_tokens < 2:
        raise EWQError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    if args.calib_sentences is not None and args.calib_sentences < 2:
        raise EWQError(f"--calib-sentences must be at least 2, got {args.calib_sentences}")
    path, plan, reused = make_plan(args.model, method=args.method, entropy=args.entropy, k=args.k, bins=HIST_BINS,
                                   target_bits=args.target_bits, max_weight_gb=args.max_weight_gb,
                                   calib_tokens=args.calib_tokens, calib_text=args.calib_text, quant_type=args.quant_type,
                                   force=args.force, models_dir=args.models_dir, out_dir=args.out_dir,
                                   progress=not args.no_progress, backend=args.backend, group_size=args.group_size,
                                   granularity=args.granularity, calib_sentences=args.calib_sentences,
                                   int8_activations=args.int8_activations, sweep=args.sweep, device=args.device,
                                   target=args.target, target_bpw=args.target_bpw,
                                   imatrix="none" if args.no_imatrix else args.imatrix or "calibration",
                                   formats=parse_formats(args.formats), speed=args.speed,
                                   decode_cost=args.decode_cost)
    print(format_summary(plan))
    if args.write_hf_config:
        from ewq.hf import write_plan_hf_config

        print(f"transformers quantization_config: {write_plan_hf_config(plan, path, args.write_hf_config)}")
    if reused:
        print("a plan for these weights and settings already existed: reused it (--force to rewrite)")
    print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
