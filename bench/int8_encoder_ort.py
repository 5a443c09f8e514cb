"""ONNX Runtime's dynamic int8 on an encoder, for bench/int8_encoder.py: run by ANOTHER Python (one with
onnxruntime, onnx, torch and transformers; never a requirement of EWQ), it exports the float model to ONNX once,
quantizes it with onnxruntime.quantization.quantize_dynamic (per tensor and per channel, QInt8 weights), and writes
JSON: sentences/s at batch 32 per variant (interleaved rounds, fixed order, padded per batch, THREADS threads) and the
mean-pooled embeddings of the evaluation sentences (the caller scores them against its own fp32 reference).

    python bench/int8_encoder_ort.py MODEL_DIR SENTENCES.json WORK_DIR OUT.json ROUNDS [THREADS]
SENTENCES.json: {"speed": [...], "eval": [...], "max_length": N}. Mean pooling only (MiniLM-L6's pooling)."""
import json
import os
import sys
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def main(model_dir, sentences_path, work, out_path, rounds, threads=1):
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    with open(sentences_path) as f:
        data = json.load(f)
    tok = AutoTokenizer.from_pretrained(model_dir)
    os.makedirs(work, exist_ok=True)
    fp32 = os.path.join(work, "fp32.onnx")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    if not os.path.exists(fp32):
        model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

        class Wrap(torch.nn.Module):  # transformers 5's BertModel.forward takes these only as keywords
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.m(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

        ex = tok(["hello world", "a longer sentence for export"], padding=True, return_tensors="pt")
        axes = {n: {0: "batch", 1: "seq"} for n in names + ["last_hidden_state"]}
        torch.onnx.export(Wrap(model).eval(), tuple(ex[n] for n in names), fp32, input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    paths = {"ORT fp32": fp32}
    for per_channel in (False, True):
        path = os.path.join(work, f"int8_{'channel' if per_channel else 'tensor'}.onnx")
        if not os.path.exists(path):
            quantize_dynamic(fp32, path, per_channel=per_channel, weight_type=QuantType.QInt8)
        paths[f"ORT int8 per-{'channel' if per_channel else 'tensor'}"] = path

    def session(path):
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1  # the torch rows' thread count
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    sessions = {k: session(p) for k, p in paths.items()}

    def batch(sess, sentences):
        b = tok(sentences, padding=True, truncation=True, max_length=data["max_length"], return_tensors="np")
        feeds = {i.name: b[i.name].astype(np.int64) for i in sess.get_inputs()}
        h = sess.run(None, feeds)[0]
        m = b["attention_mask"][..., None].astype(np.float32)
        return (h * m).sum(1) / np.clip(m.sum(1), 1, None)

    def run_all(sess, sentences):
        return np.concatenate([batch(sess, sentences[i:i + 32]) for i in range(0, len(sentences), 32)])

    speeds = {k: [] for k in sessions}
    for sess in sessions.values():
        run_all(sess, data["speed"])  # warm-up
    for _ in range(rounds):
        for k, sess in sessions.items():
            t0 = time.perf_counter()
            run_all(sess, data["speed"])
            speeds[k].append(len(data["speed"]) / (time.perf_counter() - t0))
    out = {k: {"speeds": speeds[k], "embeddings": run_all(s, data["eval"]).tolist()} for k, s in sessions.items()}
    out["_versions"] = {"onnxruntime": ort.__version__}
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]) if len(sys.argv) > 6 else 1)
