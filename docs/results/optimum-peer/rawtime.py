"""Raw ONNX Runtime decode step (past 128, 1 thread, default ORT_ENABLE_ALL), same random feeds,
both sessions interleaved: median ms per step, optimum vs lp-deploy (new and old fp32)."""

import statistics
import time

import numpy as np
import onnxruntime as ort

M = {
    "optimum": "/work/artifacts/measure/optimum-dense",
    "lp-new": "/work/artifacts/rmsfuse/dense-fp32",
    "lp-old": "/work/artifacts/quant/dense-fp32",
}
S = {}
for name, d in M.items():
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    S[name] = ort.InferenceSession(d + "/model.onnx", o, providers=["CPUExecutionProvider"])
P = 128
rng = np.random.default_rng(0)
kv = rng.random((1, 3, P, 64), dtype=np.float32)


def feeds(s):
    f = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            f[i.name] = np.array([[42]], dtype=np.int64)
        elif i.name == "attention_mask":
            f[i.name] = np.ones((1, P + 1), dtype=np.int64)
        elif i.name == "position_ids":
            f[i.name] = np.array([[P]], dtype=np.int64)
        else:
            f[i.name] = kv
    return f


F = {n: feeds(s) for n, s in S.items()}
T = {n: [] for n in S}
for _r in range(60):
    for n, s in S.items():
        t0 = time.perf_counter()
        s.run(None, F[n])
        T[n].append(time.perf_counter() - t0)
b = statistics.median(T["optimum"][5:])
for n in S:
    m = statistics.median(T[n][5:])
    print(f"{n:8s} {m * 1e3:7.2f} ms/step  ratio {m / b:.3f}")
