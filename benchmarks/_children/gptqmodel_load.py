"""Child process: GPTQModel loads a memtool checkpoint; compare its logits with memtool's."""

import contextlib
import json
import sys

import torch

folder, reference = sys.argv[1:3]
with contextlib.redirect_stdout(sys.stderr):
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoTokenizer

    model = GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.model(ids).logits.float()
    text = tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)[0])
ours = torch.load(reference)
diff = (logits - ours).abs().max().item() / ours.abs().max().item()
print(
    json.dumps(
        {
            "loaded": True,
            "max_rel_logit_diff": diff,
            "same_argmax": bool((logits.argmax(-1) == ours.argmax(-1)).all()),
            "greedy": text,
        }
    )
)
