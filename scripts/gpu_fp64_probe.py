import torch, traceback
from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs
for f, d in (("mamba2.ssm", {}), ("gla.ssm", {"H": 16, "N": 128, "P": 128})):
    c = with_dims(parse_file("examples/" + f), d)
    op = load(c)
    inp = random_inputs(c, batch=1, seqlen=1024, generator=torch.Generator().manual_seed(0))
    inp.pop("initial_state", None)
    for form in op.forms:
        leaves = {k: v.cuda().requires_grad_() for k, v in inp.items()}
        try:
            y, _ = op(**leaves, form=form)
            y.sum().backward()
            print(f, form, "fp64 fwd+bwd ok", flush=True)
        except Exception as e:
            print(f, form, "FAILED", type(e).__name__, str(e).splitlines()[-1][:200], flush=True)
