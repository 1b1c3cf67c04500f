# Times fastnn's training forward and backward ops (batch_norm_train, batch_norm_backward) on
# the shapes below, each call after 64 MB of other writes (inputs not in cache); prints a JSON
# dict "shape dtype layout" -> [forward ms, backward ms] (medians of 10 calls after 2). The trial
# build read FASTNN_REV=0/1 to walk its element-wise passes in order or reversed; main has no
# such switch.
import json
import statistics
import time

import torch

import fastnn.bench

torch.set_num_threads(2)
fastnn.bench.keep_freed_memory()  # no page faults of fresh allocations in the timings
ops = torch.ops.fastnn
SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 128, 56, 56), (32, 512, 28, 28),
          (32, 1024, 14, 14), (32, 64, 56, 56)]
res = {}
for shape in SHAPES:
    for dt in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            mf = torch.channels_last if cl else torch.contiguous_format
            C = shape[1]
            x = torch.randn(shape).to(dt).contiguous(memory_format=mf)
            g = torch.randn(shape).to(dt).contiguous(memory_format=mf)
            w, b = torch.rand(C) + 0.5, torch.randn(C)
            junk = torch.empty(64 * 2**20 // 4)
            tf, tb = [], []
            for r in range(12):
                junk.fill_(1.0)
                t0 = time.perf_counter()
                out, m, i = ops.batch_norm_train(x, w, b, None, None, 0.1, 1e-5, None, False)
                tf.append(time.perf_counter() - t0)
                junk.fill_(1.0)
                t0 = time.perf_counter()
                ops.batch_norm_backward(g, x, w, None, m, i, True, False, False)
                tb.append(time.perf_counter() - t0)
            key = f"{'x'.join(map(str, shape))} {str(dt)[6:]} {'cl' if cl else 'nchw'}"
            res[key] = (statistics.median(tf[2:]) * 1e3, statistics.median(tb[2:]) * 1e3)
print(json.dumps(res))
