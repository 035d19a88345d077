"""The fused kernels in plain PyTorch: the test oracle and the readable specification.

Every function has the name and the arguments of its op in ``kpg._ops`` (``torch.ops.kpg``) and
does, agent by agent, what ``torch.optim``'s single-tensor code does to one parameter tensor:
``_single_tensor_sgd``, ``_single_tensor_adam``, ``_single_tensor_rmsprop``,
``_single_tensor_adagrad``, ``_single_tensor_nadam`` and ``_single_tensor_radam``, with the agent's
own hyperparameter row (``hyper``, one row per agent
in the order of :attr:`kpg._ops.OptimizerKernel.row_names`), after the gradient is multiplied by the
agent's ``grad_scale`` (per-agent ``clip_grad_norm_``). Agents whose ``skip`` flag is set are left
as they are (in anticipate mode their level parameters are their base parameters), their step
count does not advance and their state stays as it was. ``live[agent, s]`` says whether state
tensor s holds values: SGD's momentum buffer starts from the gradient where it does not, as torch's
does the first time momentum is on; a commit marks the state tensors the agent's row keeps.
Per-parameter scalar state (NAdam's ``mu_product``, one 0-dim value per agent in the dtype of its
tensor) is advanced once per agent and step, as torch advances its 0-dim tensor, before the update
reads it; a commit keeps the advanced value.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kpg._ops import KERNELS


def agent_segments(chunks: Tensor) -> Iterator[tuple[int, slice]]:
    """(agent, slice of the arena) for every row of a chunk table of (agent, begin, end) rows, in
    table order: an agent of an agent-batched arena owns several separate ranges, one per row."""
    for agent, begin, end in chunks.cpu().tolist():
        yield agent, slice(begin, end)


def _scaled_grad(grad: Tensor, scale: float | None, maximize: bool) -> Tensor:
    if scale is not None:
        grad = grad * scale
    return -grad if maximize else grad


def _sgd(p, g, states, scalars, h, lr, steps_taken, scale, live):
    (buf,) = states
    g = _scaled_grad(g, scale, h["maximize"])
    if h["weight_decay"] != 0:
        g = g.add(p, alpha=h["weight_decay"])
    if h["momentum"] != 0:
        if not live[0]:
            buf.copy_(g)
        else:
            buf.mul_(h["momentum"]).add_(g, alpha=1 - h["dampening"])
        g = g.add(buf, alpha=h["momentum"]) if h["nesterov"] else buf
    p.add_(g, alpha=-lr)


def _adam_family_moments(p, g, m, v, h, lr, scale) -> Tensor:
    """The steps torch's Adam, NAdam and RAdam share, in their order: the gradient's scale and sign,
    weight decay (L2 into the gradient, or AdamW's decoupled shrink of ``p``), then both moments.
    Returns the gradient the moments saw."""
    beta1, beta2, weight_decay = h["beta1"], h["beta2"], h["weight_decay"]
    g = _scaled_grad(g, scale, h["maximize"])
    if weight_decay != 0:
        if h["decoupled_weight_decay"]:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    return g


def _adam(p, g, states, scalars, h, lr, steps_taken, scale, live):
    m, v, v_max = states
    beta1, beta2, eps = h["beta1"], h["beta2"], h["eps"]
    _adam_family_moments(p, g, m, v, h, lr, scale)
    t = steps_taken + 1
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if h["amsgrad"]:
        torch.maximum(v_max, v, out=v_max)
        denom = (v_max.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-step_size)


def _rmsprop(p, g, states, scalars, h, lr, steps_taken, scale, live):
    sq, buf, g_avg = states
    alpha = h["alpha"]
    g = _scaled_grad(g, scale, h["maximize"])
    if h["weight_decay"] != 0:
        g = g.add(p, alpha=h["weight_decay"])
    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    if h["centered"]:
        g_avg.lerp_(g, 1 - alpha)
        avg = sq.addcmul(g_avg, g_avg, value=-1).sqrt_()
    else:
        avg = sq.sqrt()
    avg = avg.add_(h["eps"])
    if h["momentum"] > 0:
        buf.mul_(h["momentum"]).addcdiv_(g, avg)
        p.add_(buf, alpha=-lr)
    else:
        p.addcdiv_(g, avg, value=-lr)


def _adagrad(p, g, states, scalars, h, lr, steps_taken, scale, live):
    (state_sum,) = states
    g = _scaled_grad(g, scale, h["maximize"])
    if h["weight_decay"] != 0:
        g = g.add(p, alpha=h["weight_decay"])
    clr = lr / (1 + steps_taken * h["lr_decay"])
    state_sum.addcmul_(g, g, value=1)
    std = state_sum.sqrt().add_(h["eps"])
    p.addcdiv_(g, std, value=-clr)


def _nadam_mu(h, step):
    return h["beta1"] * (1.0 - 0.5 * (0.96 ** (step * h["momentum_decay"])))


def _advance_nadam(scalars, h, steps_taken):
    (mu_product,) = scalars
    mu_product *= _nadam_mu(h, steps_taken + 1)


def _nadam(p, g, states, scalars, h, lr, steps_taken, scale, live):
    m, v = states
    mu_product = float(scalars[0])
    beta2 = h["beta2"]
    t = steps_taken + 1
    bias_correction2 = 1 - beta2**t
    g = _adam_family_moments(p, g, m, v, h, lr, scale)
    mu, mu_next = _nadam_mu(h, t), _nadam_mu(h, t + 1)
    denom = v.div(bias_correction2).sqrt().add_(h["eps"])
    mu_product_next = mu_product * mu_next
    p.addcdiv_(g, denom, value=-lr * (1.0 - mu) / (1.0 - mu_product))
    p.addcdiv_(m, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))


def _radam(p, g, states, scalars, h, lr, steps_taken, scale, live):
    m, v = states
    beta1, beta2 = h["beta1"], h["beta2"]
    g = _adam_family_moments(p, g, m, v, h, lr, scale)
    t = steps_taken + 1
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    bias_corrected = m / bias_correction1
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2**t) / bias_correction2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        adaptive_lr = (bias_correction2**0.5) / v.sqrt().add_(h["eps"])
        p.add_(bias_corrected * lr * adaptive_lr * rect, alpha=-1.0)
    else:
        p.add_(bias_corrected * lr, alpha=-1.0)


_UPDATES = {"sgd": _sgd, "adam": _adam, "rmsprop": _rmsprop, "adagrad": _adagrad, "nadam": _nadam, "radam": _radam}
# How a step advances a family's per-parameter scalar state, before the update reads it.
_SCALAR_ADVANCES = {"nadam": _advance_nadam}


def _run(kind, commit, param, grad, anticipated, states, scalars, step, live, lr, hyper, grad_scale, skip, chunks):
    """Applies the family's update to every chunk row with its agent's values. Commit mode updates
    the slices in place; anticipate mode updates clones and writes only the parameters."""
    kernel = KERNELS[kind]
    rows = [dict(zip(kernel.row_names, row)) for row in hyper.cpu().tolist()]
    steps, lrs, lives = step.cpu().tolist(), lr.cpu().tolist(), live.cpu().tolist()
    scales = grad_scale.cpu().tolist() if grad_scale is not None else [None] * len(steps)
    skips = skip.cpu().tolist() if skip is not None else [0] * len(steps)
    # Every agent's scalar state as this step leaves it: 0-dim tensors of the scalar state's dtype.
    advanced = [[s[agent].cpu().clone() for s in scalars] for agent in range(len(steps))]
    if scalars:
        for agent, agent_scalars in enumerate(advanced):
            _SCALAR_ADVANCES[kind](agent_scalars, rows[agent], steps[agent])
    for agent, segment in agent_segments(chunks):
        if skips[agent]:
            if not commit:
                anticipated[segment] = param[segment]
            continue
        p = param[segment] if commit else param[segment].clone()
        agent_states = [None if s is None else (s[segment] if commit else s[segment].clone()) for s in states]
        _UPDATES[kind](
            p,
            grad[segment],
            agent_states,
            advanced[agent],
            rows[agent],
            lrs[agent],
            steps[agent],
            scales[agent],
            lives[agent],
        )
        if not commit:
            anticipated[segment] = p
    if commit:
        for agent, row in enumerate(hyper.cpu().numpy()):
            if skips[agent]:
                continue
            step[agent] += 1.0
            for s, value in zip(scalars, advanced[agent]):
                s[agent] = value
            kept = kernel.kept_states(row.reshape(1, -1))[0]
            for s, keep in enumerate(kept):
                if keep:
                    live[agent, s] = 1


def _make(kind: str, commit: bool):
    """The reference of op ``<kind>_<mode>``: the op's arguments, by position or by name."""
    names, scalar_names = KERNELS[kind].state_names, KERNELS[kind].scalar_names
    per_agent = ("step", "live", "lr", "hyper", "grad_scale", "skip", "chunks")
    arguments = ("param", "grad", *(() if commit else ("anticipated",)), *names, *scalar_names, *per_agent)

    def update(*args, **kwargs) -> None:
        values = dict(zip(arguments, args)) | kwargs
        missing = [name for name in arguments if name not in values]
        if missing or len(values) != len(arguments):
            raise TypeError(f"{update.__name__} takes ({', '.join(arguments)}); missing {missing}")
        _run(
            kind,
            commit,
            values["param"],
            values["grad"],
            values.get("anticipated"),
            [values[n] for n in names],
            [values[n] for n in scalar_names],
            *(values[n] for n in per_agent),
        )

    update.__name__ = f"{kind}_{'commit' if commit else 'anticipate'}"
    update.__doc__ = f"``kpg._ops.{update.__name__}`` in plain PyTorch: ({', '.join(arguments)})."
    return update


UPDATE_OPS = {(kind, commit): _make(kind, commit) for kind in KERNELS for commit in (False, True)}
# Each reference also as kpg.reference.<family>_<mode>, as kpg._ops names its op.
globals().update({update.__name__: update for update in UPDATE_OPS.values()})


def agent_grad_norms(grad, chunks, agent_chunks, chunk_sq, max_norm, norm, grad_scale, nonfinite) -> None:
    """Per-agent 2-norm of the gradient (summed in float64), torch's clipping coefficient, flags."""
    squares = [torch.zeros((), dtype=torch.float64) for _ in range(norm.numel())]
    for c, (agent, begin, end) in enumerate(chunks.cpu().tolist()):
        chunk_sq[c] = grad[begin:end].double().square().sum()
        squares[agent] = squares[agent] + grad[begin:end].double().square().sum()
    for agent, square in enumerate(squares):
        agent_norm = square.sqrt()
        norm[agent] = agent_norm
        nonfinite[agent] = int(not torch.isfinite(agent_norm))
        if max_norm is None:
            grad_scale[agent] = 1.0
        else:
            grad_scale[agent] = torch.clamp(max_norm[agent] / (agent_norm + 1e-6), max=1.0)


# ---- momentum anticipation (kpg.anticipation), agent by agent --------------------------------------


def _agent_slices(tiling) -> dict[int, list[slice]]:
    """Each agent's element runs of an AgentTiling, as slices of the arena."""
    slices: dict[int, list[slice]] = {agent: [] for agent in range(tiling.num_agents)}
    begin = 0
    for agent, length in zip(tiling.agents.tolist(), tiling.lengths.tolist()):
        slices[agent].append(slice(begin, begin + length))
        begin += length
    return slices


def _agent_vector(buffer: Tensor, runs: list[slice]) -> Tensor:
    return torch.cat([buffer[run] for run in runs]).to(torch.float64)


def momentum_predict(param, latest, gate, anticipated, base, tiling) -> None:
    for agent, runs in _agent_slices(tiling).items():
        for run in runs:
            anticipated[run] = param[run] + float(gate[agent]) * latest[run]
            base[run] = param[run]


def _gate(u1: Tensor, u2: Tensor) -> float:
    norms = u1.norm() * u2.norm()
    if norms == 0:
        return 0.0
    return float((u1.dot(u2) / norms).clamp(0.0, 1.0))


def momentum_record(param, base, latest, latest_sq, gate, tiling) -> None:
    for agent, runs in _agent_slices(tiling).items():
        previous = _agent_vector(latest, runs)
        for run in runs:
            latest[run] = param[run] - base[run]
        fresh = _agent_vector(latest, runs)
        gate[agent] = _gate(fresh, previous)
        latest_sq[agent] = fresh.dot(fresh)


def momentum_audit(param, exact, latest, latest_sq, gate, tiling) -> dict[str, Tensor]:
    figures = {name: torch.full_like(gate, float("nan")) for name in ("cosine", "relative_error", "norm_ratio")}
    for agent, runs in _agent_slices(tiling).items():
        step = _agent_vector(exact, runs) - _agent_vector(param, runs)
        u1 = _agent_vector(latest, runs)
        prediction = float(gate[agent]) * u1
        if u1.norm() > 0 and step.norm() > 0:
            figures["cosine"][agent] = u1.dot(step) / (u1.norm() * step.norm())
        if step.norm() > 0:
            figures["relative_error"][agent] = (prediction - step).norm() / step.norm()
            figures["norm_ratio"][agent] = prediction.norm() / step.norm()
    return {"gate": gate.clone(), **figures}
