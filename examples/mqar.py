"""Multi-query associative recall (MQAR, Zoology: Arora, Eyuboglu et al. 2023) on ssmc layers.

    python examples/mqar.py examples/mamba2.ssm [SPEC[:K=V,...] ...] [--device cuda]

A sequence holds `pairs` key-value pairs, then queries: each key again, at power-law
distributed gaps, amid random tokens; at a query the model must output the key's value.
Per spec, a small LM (embedding → 2 × [RMSNorm → SequenceMixer(spec) → residual →
RMSNorm → MLP → residual] → RMSNorm → head) trains with AdamW on freshly drawn batches
(with --curriculum zoology, the default, also from Zoology's mixture of shorter and
easier settings, the full one's share growing to half by the end), bf16 autocast on CUDA;
a softmax-attention baseline (SDPA, causal, rotary) trains after them. Each model stops when its accuracy on a fixed held-out set reaches
--target, after --steps, or after --time-budget seconds (--baseline-budget for attention);
the warmup + cosine schedule runs over whichever of steps or time ends first. One untimed
forward/backward first compiles the kernels (reported apart). The table of spec, dims,
parameters, held-out accuracy, steps and seconds is printed last.

Recipe: a Mamba-2 layer as initialised in Mamba (skip D = 1, gate silu(z) with z a plain
projection) sits at chance on MQAR for thousands of steps (the op and its gradients are
right): the skip adds the current token to every head's output and the gate multiplies the
recalled value by a token-dependent random mask, both before the norm, so the recall path
gets almost no gradient. Here D starts at 0 (--skip-init) and z has a learned bias starting
at 3 (--gate-bias), so silu(z) ≈ 2.9 varies little across tokens; both stay trainable.

Each spec's dims are rebound to the model width: head dim P = --headdim, state N =
--d-state, H = expand·d_model / P, other head groups kept if they divide H (else 1);
--dims K=V,... and SPEC:K=V,... override them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssmc import ir  # noqa: E402
from ssmc.bind import size_of  # noqa: E402
from ssmc.load import as_checked  # noqa: E402
from ssmc.nn import RMSNormGroups, SequenceMixer  # noqa: E402

ATTENTION = "attention"
IGNORE = -100


# ---------------------------------------------------------------- data


def mqar_batch(
    batch: int,
    seqlen: int,
    pairs: int,
    vocab: int,
    *,
    power_a: float = 0.01,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """(tokens [batch, T], labels [batch, T]): `pairs` (key, value) tokens, then each key
    once more as a query at an even offset 2·gap past the pairs (gaps distinct, P(gap = g)
    ∝ (g + 1)^(power_a − 1)), random tokens elsewhere. Keys are drawn from [1, vocab/2),
    values from [vocab/2, vocab), distinct within a sequence; labels hold the key's value
    at each query and IGNORE everywhere else."""
    context = 2 * pairs
    space = (seqlen - context) // 2
    if space < pairs or vocab // 2 - 1 < pairs:
        raise ValueError(f"{pairs} pairs need seqlen ≥ {4 * pairs} and vocab > {2 * pairs + 1}")
    g = {"generator": generator, "device": device}
    half = vocab // 2
    keys = 1 + torch.rand(batch, half - 1, **g).topk(pairs, -1).indices
    values = half + torch.rand(batch, vocab - half, **g).topk(pairs, -1).indices
    weights = torch.arange(1, space + 1, device=device, dtype=torch.float32) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(batch, space).contiguous(), pairs, generator=generator)
    tokens = torch.randint(vocab, (batch, seqlen), **g)
    tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
    where = context + 2 * gaps
    tokens.scatter_(1, where, keys)
    labels = torch.full_like(tokens, IGNORE).scatter_(1, where, values)
    return tokens, labels


# ---------------------------------------------------------------- models


class Attention(nn.Module):
    """Causal softmax attention with rotary positions (the baseline)."""

    def __init__(self, d_model: int, headdim: int = 64) -> None:
        super().__init__()
        self.heads, self.headdim = max(1, d_model // headdim), min(headdim, d_model)
        self.qkv = nn.Linear(d_model, 3 * self.heads * self.headdim, bias=False)
        self.out = nn.Linear(self.heads * self.headdim, d_model, bias=False)

    def forward(self, u: Tensor) -> Tensor:
        b, T, _ = u.shape
        q, k, v = self.qkv(u).view(b, T, 3, self.heads, self.headdim).permute(2, 0, 3, 1, 4)
        q, k = _rotary(q), _rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


def _rotary(x: Tensor) -> Tensor:
    """RoPE on [b, heads, T, d]."""
    T, d = x.shape[-2], x.shape[-1]
    freq = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angle = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int) -> None:
        super().__init__()
        self.norm1, self.mixer = RMSNormGroups(d_model), mixer
        self.norm2 = RMSNormGroups(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.mixer(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class LM(nn.Module):
    """embedding → blocks → RMSNorm → head; logits only where labels are set."""

    def __init__(self, mixers: list[nn.Module], d_model: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(m, d_model) for m in mixers)
        self.norm = RMSNormGroups(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(logits [queries, vocab], their labels [queries])."""
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        at = labels != IGNORE
        return self.head(self.norm(h[at])), labels[at]


def mixer_dims(
    checked: ir.CheckedSpec, d_model: int, expand: int, headdim: int, d_state: int
) -> dict[str, int]:
    """The spec's dims rebound to a model of width d_model (see the module docstring)."""
    declared = {d.name: d.value for d in checked.spec.dims}
    H, P, N = checked.heads.output, checked.head_dim, checked.state_size
    dims = {name: value for name, value in declared.items() if value is not None}
    if isinstance(P, str):
        dims[P] = headdim
    if isinstance(N, str) and N != P:
        dims[N] = d_state
    if isinstance(H, str):
        dims[H] = max(1, expand * d_model // size_of(P, dims))
        counts = checked.heads
        for G in (counts.query, counts.key, counts.value, counts.decay):
            if isinstance(G, str) and G != H and dims[H] % dims.get(G, 1):
                dims[G] = 1
    return dims


def build(name: str, args: argparse.Namespace) -> LM:
    """The LM for one SPEC[:K=V,...] argument (or the attention baseline)."""
    if name == ATTENTION:
        mixers: list[nn.Module] = [Attention(args.d_model) for _ in range(args.layers)]
        return LM(mixers, args.d_model, args.vocab)
    path, _, extra = name.partition(":")
    checked = as_checked(path)
    dims = mixer_dims(checked, args.d_model, args.expand, args.headdim, args.d_state)
    declared = {d.name for d in checked.spec.dims}
    dims |= {k: v for k, v in parse_dims(args.dims).items() if k in declared}
    dims |= parse_dims(extra)
    mixers = [
        SequenceMixer(
            checked,
            args.d_model,
            expand=args.expand,
            dims=dims,
            d_conv=args.d_conv,
            form=args.form,
            chunk_size=args.chunk_size,
            use_reference=args.reference,
            skip_init=args.skip_init,
            gate_bias=args.gate_bias,
        )
        for _ in range(args.layers)
    ]
    return LM(mixers, args.d_model, args.vocab)


def parse_dims(text: str) -> dict[str, int]:
    """ "H=8,N=64" → {"H": 8, "N": 64}."""
    pairs = (item.split("=") for item in text.split(",") if item.strip())
    return {k.strip(): int(v) for k, v in pairs}


# ---------------------------------------------------------------- training


@dataclass
class Result:
    spec: str
    params: int
    accuracy: float
    steps: int
    seconds: float
    compile_seconds: float
    detail: str
    history: list[tuple[int, float, float, float, float]]
    """(step, seconds, training loss, held-out accuracy, easiest setting's) per evaluation."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices only (not on norms, biases, embeddings or spec params)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        matrix = p.dim() >= 2 and ".params." not in name and "embed" not in name
        (decay if matrix else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(
    model: LM, data: list[tuple[Tensor, Tensor]], autocast: contextlib.AbstractContextManager
) -> float:  # type: ignore[type-arg]
    model.eval()
    right = total = 0
    for tokens, labels in data:
        with autocast:
            logits, want = model(tokens, labels)
        right += int((logits.argmax(-1) == want).sum())
        total += want.numel()
    model.train()
    return right / max(total, 1)


@dataclass(frozen=True)
class Level:
    """One training setting of the curriculum and its base weight."""

    weight: float
    batch: int
    seqlen: int
    pairs: int


ZOOLOGY = ((5.0, 4, 16), (1.0, 2, 8), (1.0, 1, 4), (1.0, 1, 2), (1.0, 1, 1))
"""Zoology's MQAR training mixture (arxiv24_based_figure2) as (examples weight, T divisor,
pairs divisor): 100k of (64, 4), 20k each of (128, 8), (256, 16), (256, 32), (256, 64)."""


def curriculum(args: argparse.Namespace) -> list[Level]:
    """The mixture scaled to (--seqlen, --pairs), the full setting last; shorter settings get
    a larger batch so every step sees about the same number of tokens."""
    if args.curriculum == "none":
        return [Level(1.0, args.batch, args.seqlen, args.pairs)]
    found: dict[tuple[int, int], Level] = {}
    for weight, t_div, p_div in ZOOLOGY:
        T, pairs = args.seqlen // t_div, args.pairs // p_div
        if pairs >= 1 and T >= 4 * pairs and (T, pairs) not in found:
            found[(T, pairs)] = Level(weight, args.batch * args.seqlen // T, T, pairs)
    found.pop((args.seqlen, args.pairs), None)
    return [*found.values(), Level(1.0, args.batch, args.seqlen, args.pairs)]


class Sampler:
    """Fresh training batches from the curriculum. The full setting's weight grows with
    training progress from its base to half of all batches (the easy settings start the
    recall circuit; the full one is what is measured)."""

    def __init__(self, args: argparse.Namespace, seed: int, device: torch.device) -> None:
        self.levels, self.vocab, self.device = curriculum(args), args.vocab, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.choice = random.Random(seed)

    def __call__(self, progress: float) -> tuple[Tensor, Tensor]:
        easy = sum(level.weight for level in self.levels[:-1])
        weights = [level.weight for level in self.levels[:-1]]
        weights.append(self.levels[-1].weight + min(1.0, progress) * max(0.0, easy - 1.0))
        level = self.choice.choices(self.levels, weights)[0]
        return mqar_batch(
            level.batch,
            level.seqlen,
            level.pairs,
            self.vocab,
            generator=self.generator,
            device=self.device,
        )


def learning_rate(args: argparse.Namespace, progress: float) -> float:
    """Linear warmup over the first --warmup of the schedule, then cosine to 0."""
    if progress < args.warmup:
        return args.lr * max(progress, 1e-3) / args.warmup
    done = min(1.0, (progress - args.warmup) / (1 - args.warmup))
    return args.lr * 0.5 * (1 + math.cos(math.pi * done))


def train(name: str, args: argparse.Namespace, device: torch.device) -> Result:
    torch.manual_seed(args.seed)
    model = build(name, args).to(device)
    params = sum(p.numel() for p in model.parameters())
    eval_gen = torch.Generator(device=device).manual_seed(args.seed + 12345)
    eval_batch = min(args.batch, args.eval_size)
    eval_set = [
        mqar_batch(
            eval_batch, args.seqlen, args.pairs, args.vocab, generator=eval_gen, device=device
        )
        for _ in range(max(1, args.eval_size // eval_batch))
    ]
    optimizer = torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(0.9, 0.98),
        fused=device.type == "cuda",
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    sample = Sampler(args, args.seed, device)
    easiest = sample.levels[0]
    # The easiest setting's accuracy too: it shows the recall circuit forming.
    easy_set = [
        mqar_batch(
            eval_batch, easiest.seqlen, easiest.pairs, args.vocab, generator=eval_gen, device=device
        )
    ]

    def loss_of(tokens: Tensor, labels: Tensor) -> Tensor:
        with autocast:
            logits, want = model(tokens, labels)
            return F.cross_entropy(logits.float(), want)

    # One untimed forward/backward per shape first: kernels compile (and autotune).
    started = time.perf_counter()
    for level in sample.levels:
        warm = mqar_batch(level.batch, level.seqlen, level.pairs, args.vocab, device=device)
        loss_of(*warm).backward()
    evaluate(model, eval_set[:1] + easy_set, autocast)
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    compile_seconds = time.perf_counter() - started

    budget = args.baseline_budget if name == ATTENTION else args.time_budget
    started = time.perf_counter()
    accuracy, step, history = 0.0, 0, []
    for step in range(1, args.steps + 1):
        elapsed = time.perf_counter() - started
        # The schedule runs to whichever ends first: the steps or the time budget.
        progress = max(step / args.steps, elapsed / budget)
        lr = learning_rate(args, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_of(*sample(progress))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last = step == args.steps or elapsed >= budget
        if step % args.eval_every == 0 or last:
            accuracy = evaluate(model, eval_set, autocast)
            easy = evaluate(model, easy_set, autocast)
            history.append((step, round(elapsed, 2), round(loss.item(), 4), accuracy, easy))
            if not args.quiet:
                print(
                    f"  {label(name):<24} step {step:>6}  loss {loss.item():.3f}  "
                    f"acc {accuracy:.4f}  easiest {easy:.4f}  lr {lr:.2e}  {elapsed:.0f}s",
                    flush=True,
                )
            if accuracy >= args.target or last:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return Result(
        label(name), params, accuracy, step, seconds, compile_seconds, describe(model), history
    )


def label(name: str) -> str:
    return (
        name
        if name == ATTENTION
        else Path(name.partition(":")[0]).stem
        + (":" + name.partition(":")[2] if ":" in name else "")
    )


def describe(model: LM) -> str:
    mixer = model.blocks[0].mixer
    if isinstance(mixer, SequenceMixer):
        return ",".join(f"{k}={v}" for k, v in mixer.sizes.items())
    assert isinstance(mixer, Attention)
    return f"heads={mixer.heads},headdim={mixer.headdim}"


def table(results: list[Result]) -> str:
    rows = [("spec", "dims", "params", "accuracy", "steps", "seconds", "compile s")]
    rows += [
        (
            r.spec,
            r.detail,
            f"{r.params:,}",
            f"{100 * r.accuracy:.2f}%",
            str(r.steps),
            f"{r.seconds:.1f}",
            f"{r.compile_seconds:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("specs", nargs="*", metavar="SPEC", help="a .ssm path, optionally :K=V,...")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--d-state", type=int, default=128)
    p.add_argument("--d-conv", type=int, default=4)
    p.add_argument("--dims", default="", help="K=V,... for every spec that declares K")
    p.add_argument(
        "--skip-init",
        type=float,
        default=0.0,
        help="initial skip param (Mamba's D); Mamba's 1 keeps recall at chance far longer",
    )
    p.add_argument(
        "--gate-bias",
        type=float,
        default=3.0,
        help="bias on the gate's projected input (z), so silu(z) starts open (nan: no bias)",
    )
    p.add_argument(
        "--form",
        choices=["recurrent", "quadratic", "chunked", "convolution"],
        help="force the op's form (default: the planner's)",
    )
    p.add_argument("--chunk-size", type=int, help="force the chunk of the chunked form")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=float, default=0.02, help="fraction of the schedule")
    p.add_argument(
        "--curriculum",
        choices=["zoology", "none"],
        default="zoology",
        help="train on Zoology's mixture of easier settings too, or only the full one",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="run the PyTorch reference instead of the op (faster CPU experiments)",
    )
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds per spec's model")
    p.add_argument("--baseline-budget", type=float, default=90.0, help="seconds for attention")
    p.add_argument("--target", type=float, default=0.995, help="stop at this eval accuracy")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-attention", action="store_true", help="skip the attention baseline")
    p.add_argument("--json", metavar="OUT", help="write the results here")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: a few steps at T = 32")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per evaluation")
    args = p.parse_args(argv)
    args.gate_bias = (
        None if args.gate_bias is None or math.isnan(args.gate_bias) else args.gate_bias
    )
    if args.tiny:
        args.seqlen, args.pairs, args.vocab, args.d_model = 32, 4, 64, 32
        args.headdim, args.d_state, args.batch, args.steps = 8, 8, 8, 4
        args.eval_every, args.eval_size = 2, 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message="ssmc: CPU tensors")
    # The specs first, the baseline last; the JSON is rewritten after each model, so a run
    # cut short still leaves what it finished.
    names = list(args.specs) + ([] if args.no_attention else [ATTENTION])
    results: list[Result] = []
    for name in names:
        results.append(train(name, args, device))
        r = results[-1]
        print(
            f"{r.spec}: {100 * r.accuracy:.2f}% after {r.steps} steps, {r.seconds:.1f}s", flush=True
        )
        if args.json:
            config = {k: v for k, v in vars(args).items() if k not in ("json", "specs")}
            payload = {
                "config": config,
                "device": describe_device(device),
                "results": [asdict(r) for r in results],
            }
            Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(table(results))
    return 0


def describe_device(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name}, torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
