"""The fused kernels in plain PyTorch: the test oracle and the readable specification.

Every function has the name and the arguments of its op in ``kpg._ops`` (``torch.ops.kpg``) and
does, agent by agent, what ``torch.optim``'s single-tensor code does to one parameter tensor:
``_single_tensor_sgd``, ``_single_tensor_adam`` and ``_single_tensor_rmsprop``, after the
gradient is multiplied by the agent's ``grad_scale`` (per-agent ``clip_grad_norm_``). Agents whose
``skip`` flag is set are left as they are (in anticipate mode their level parameters are their base
parameters) and their step count does not advance.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def agent_segments(chunks: Tensor, num_agents: int) -> Iterator[tuple[int, slice]]:
    """(agent, slice of the arena) for every agent, from a chunk table of (agent, begin, end) rows."""
    bounds: dict[int, list[int]] = {}
    for agent, begin, end in chunks.cpu().tolist():
        lo_hi = bounds.setdefault(agent, [begin, end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], begin), max(lo_hi[1], end)
    for agent in range(num_agents):
        begin, end = bounds.get(agent, (0, 0))
        yield agent, slice(begin, end)


def _agent_values(step: Tensor, lr: Tensor, grad_scale: Tensor | None, skip: Tensor | None):
    steps = step.cpu().tolist()
    lrs = lr.cpu().tolist()
    scales = grad_scale.cpu().tolist() if grad_scale is not None else [None] * len(steps)
    skips = skip.cpu().tolist() if skip is not None else [0] * len(steps)
    return steps, lrs, scales, skips


def _scaled_grad(grad: Tensor, scale: float | None, maximize: bool) -> Tensor:
    if scale is not None:
        grad = grad * scale
    return -grad if maximize else grad


def _advance_steps(step: Tensor, skip: Tensor | None) -> None:
    step += 1.0 if skip is None else (skip == 0).to(step.dtype)


def _run(commit: bool, param, grad, anticipated, states, step, lr, grad_scale, skip, chunks, update_agent):
    """Applies update_agent(agent, param slice, grad slice, state slices, lr, step, scale) per agent.

    Commit mode updates the slices in place; anticipate mode updates clones and writes only the
    parameters, to ``anticipated``.
    """
    steps, lrs, scales, skips = _agent_values(step, lr, grad_scale, skip)
    for agent, segment in agent_segments(chunks, step.numel()):
        if skips[agent]:
            if not commit:
                anticipated[segment] = param[segment]
            continue
        p = param[segment] if commit else param[segment].clone()
        agent_states = [
            None if s is None else (s[segment] if commit else s[segment].clone()) for s in states
        ]
        update_agent(p, grad[segment], agent_states, lrs[agent], steps[agent], scales[agent])
        if not commit:
            anticipated[segment] = p
    if commit:
        _advance_steps(step, skip)


def _sgd(commit, param, grad, anticipated, momentum_buffer, step, lr, grad_scale, skip, chunks,
         momentum, dampening, weight_decay, nesterov, maximize):
    def update_agent(p, g, states, agent_lr, steps_taken, scale):
        (buf,) = states
        g = _scaled_grad(g, scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if steps_taken == 0:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
        p.add_(g, alpha=-agent_lr)

    _run(commit, param, grad, anticipated, [momentum_buffer], step, lr, grad_scale, skip, chunks, update_agent)


def _adam(commit, param, grad, anticipated, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale,
          skip, chunks, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    def update_agent(p, g, states, agent_lr, steps_taken, scale):
        m, v, v_max = states
        g = _scaled_grad(g, scale, maximize)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - agent_lr * weight_decay)
            else:
                g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = steps_taken + 1
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = agent_lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if amsgrad:
            torch.maximum(v_max, v, out=v_max)
            denom = (v_max.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)

    _run(commit, param, grad, anticipated, [exp_avg, exp_avg_sq, max_exp_avg_sq], step, lr, grad_scale,
         skip, chunks, update_agent)


def _rmsprop(commit, param, grad, anticipated, square_avg, momentum_buffer, grad_avg, step, lr, grad_scale,
             skip, chunks, alpha, eps, weight_decay, momentum, centered, maximize):
    def update_agent(p, g, states, agent_lr, steps_taken, scale):
        sq, buf, g_avg = states
        g = _scaled_grad(g, scale, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
        if centered:
            g_avg.lerp_(g, 1 - alpha)
            avg = sq.addcmul(g_avg, g_avg, value=-1).sqrt_()
        else:
            avg = sq.sqrt()
        avg = avg.add_(eps)
        if momentum > 0:
            buf.mul_(momentum).addcdiv_(g, avg)
            p.add_(buf, alpha=-agent_lr)
        else:
            p.addcdiv_(g, avg, value=-agent_lr)

    _run(commit, param, grad, anticipated, [square_avg, momentum_buffer, grad_avg], step, lr, grad_scale,
         skip, chunks, update_agent)


def sgd_anticipate(param, grad, anticipated, momentum_buffer, step, lr, grad_scale, skip, chunks, momentum,
                   dampening, weight_decay, nesterov, maximize) -> None:
    _sgd(False, param, grad, anticipated, momentum_buffer, step, lr, grad_scale, skip, chunks, momentum,
         dampening, weight_decay, nesterov, maximize)


def sgd_commit(param, grad, momentum_buffer, step, lr, grad_scale, skip, chunks, momentum, dampening,
               weight_decay, nesterov, maximize) -> None:
    _sgd(True, param, grad, None, momentum_buffer, step, lr, grad_scale, skip, chunks, momentum, dampening,
         weight_decay, nesterov, maximize)


def adam_anticipate(param, grad, anticipated, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale,
                    skip, chunks, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    decoupled_weight_decay) -> None:
    _adam(False, param, grad, anticipated, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale, skip,
          chunks, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


def adam_commit(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale, skip, chunks, beta1,
                beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay) -> None:
    _adam(True, param, grad, None, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, grad_scale, skip, chunks,
          beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay)


def rmsprop_anticipate(param, grad, anticipated, square_avg, momentum_buffer, grad_avg, step, lr, grad_scale,
                       skip, chunks, alpha, eps, weight_decay, momentum, centered, maximize) -> None:
    _rmsprop(False, param, grad, anticipated, square_avg, momentum_buffer, grad_avg, step, lr, grad_scale, skip,
             chunks, alpha, eps, weight_decay, momentum, centered, maximize)


def rmsprop_commit(param, grad, square_avg, momentum_buffer, grad_avg, step, lr, grad_scale, skip, chunks,
                   alpha, eps, weight_decay, momentum, centered, maximize) -> None:
    _rmsprop(True, param, grad, None, square_avg, momentum_buffer, grad_avg, step, lr, grad_scale, skip, chunks,
             alpha, eps, weight_decay, momentum, centered, maximize)


def agent_grad_norms(grad, chunks, agent_chunks, chunk_sq, max_norm, norm, grad_scale, nonfinite) -> None:
    """Per-agent 2-norm of the gradient (summed in float64), torch's clipping coefficient, flags."""
    for c, (_, begin, end) in enumerate(chunks.cpu().tolist()):
        chunk_sq[c] = grad[begin:end].double().square().sum()
    for agent, segment in agent_segments(chunks, norm.numel()):
        agent_norm = grad[segment].double().square().sum().sqrt()
        norm[agent] = agent_norm
        nonfinite[agent] = int(not torch.isfinite(agent_norm))
        if max_norm is None:
            grad_scale[agent] = 1.0
        else:
            grad_scale[agent] = torch.clamp(max_norm[agent] / (agent_norm + 1e-6), max=1.0)


UPDATE_OPS = {
    ("sgd", False): sgd_anticipate,
    ("sgd", True): sgd_commit,
    ("adam", False): adam_anticipate,
    ("adam", True): adam_commit,
    ("rmsprop", False): rmsprop_anticipate,
    ("rmsprop", True): rmsprop_commit,
}
