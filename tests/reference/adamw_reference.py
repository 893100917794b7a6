"""torch.optim.AdamW with HF's linear warmup schedule and clip_grad_norm_, for optimiser
parity tests. Reads JSON on stdin: {"params": [[...], ...], "grads": [step][param][...],
"lr": float, "warmup": int, "total": int, "max_grad_norm": float, "weight_decay": float}.
Prints JSON {"params": [[...], ...] after every step, "lrs": [...], "norms": [...]}.
"""
import json
import sys

import torch
from transformers import get_linear_schedule_with_warmup


def main():
    job = json.load(sys.stdin)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in job["params"]]
    opt = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=job["weight_decay"])
    sched = get_linear_schedule_with_warmup(opt, job["warmup"], job["total"])
    lrs, norms = [], []
    for grads in job["grads"]:
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, job["max_grad_norm"])))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        opt.zero_grad()
    print(json.dumps({"params": [p.detach().tolist() for p in params], "lrs": lrs, "norms": norms}))


if __name__ == "__main__":
    main()
