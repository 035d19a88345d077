// The per-element arithmetic of SGD, Adam/AdamW, RMSprop, Adagrad, NAdam and RAdam: one function
// per optimizer, called through its traits type (optimizers.h) by the CPU loops (update_cpu.cpp)
// and the CUDA kernels (update_cuda.cu). Each mirrors the single-tensor path of torch.optim
// (foreach=False, fused=False, capturable=False) operation by operation: per-agent scalars are
// computed in double, as torch does with Python floats, then cast to the parameter type, as torch
// casts a Scalar argument.
#pragma once

#include <cmath>

#include "kpg/common.h"

namespace kpg {

template <typename T>
KPG_HD T math_sqrt(T x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// torch.maximum: NaN in either operand wins.
template <typename T>
KPG_HD T nan_propagating_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// at::lerp (ATen/native/Lerp.h): the formula flips at |weight| = 0.5 to stay exact at both ends.
template <typename T>
KPG_HD T lerp(T self, T end, T weight, bool weight_is_small) {
  return weight_is_small ? self + weight * (end - self) : end - (end - self) * (T(1) - weight);
}

// ---- SGD: torch.optim.sgd._single_tensor_sgd ------------------------------------------------
template <typename T>
struct SGDCoefficients {
  T grad_scale, weight_decay, momentum, one_minus_dampening, neg_lr;
};

template <typename T>
KPG_HD SGDCoefficients<T> sgd_coefficients(double momentum, double dampening, double weight_decay,
                                           double lr, double grad_scale) {
  return {T(grad_scale), T(weight_decay), T(momentum), T(1.0 - dampening), T(-lr)};
}

// first_step: the momentum buffer does not exist yet in torch (it is cloned from the gradient): the
// first step with momentum on, which need not be the optimizer's first step.
template <typename T>
KPG_HD void sgd_element(T& param, T grad, T& momentum_buffer, const SGDCoefficients<T>& c,
                        bool maximize, bool has_weight_decay, bool has_momentum, bool first_step,
                        bool nesterov) {
  grad = grad * c.grad_scale;
  if (maximize) grad = -grad;
  if (has_weight_decay) grad = grad + c.weight_decay * param;
  if (has_momentum) {
    momentum_buffer =
        first_step ? grad : momentum_buffer * c.momentum + c.one_minus_dampening * grad;
    grad = nesterov ? grad + c.momentum * momentum_buffer : momentum_buffer;
  }
  param = param + c.neg_lr * grad;
}

// ---- Adam / AdamW: torch.optim.adam._single_tensor_adam ---------------------------------------
// The steps torch's Adam, NAdam and RAdam share, in their order: the gradient's scale, sign and
// weight decay (L2 into the gradient, or AdamW's decoupled shrink of the parameter), then the two
// moments. Their coefficient structs name these fields alike.
template <typename T, typename Coefficients>
KPG_HD T adam_family_gradient(T& param, T grad, const Coefficients& c, bool maximize,
                              bool has_weight_decay, bool decoupled_weight_decay) {
  grad = grad * c.grad_scale;
  if (maximize) grad = -grad;
  if (has_weight_decay) {
    if (decoupled_weight_decay) {
      param = param * c.decay_factor;
    } else {
      grad = grad + c.weight_decay * param;
    }
  }
  return grad;
}

template <typename T, typename Coefficients>
KPG_HD void adam_family_moments(T& exp_avg, T& exp_avg_sq, T grad, const Coefficients& c) {
  exp_avg = lerp(exp_avg, grad, c.one_minus_beta1, c.beta1_weight_is_small);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * grad * grad;
}

template <typename T>
struct AdamCoefficients {
  T grad_scale, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
      bias_correction2_sqrt, eps, neg_step_size;
  bool beta1_weight_is_small;
};

// step: the step being taken, counted from 1, as torch's state["step"] after its increment.
template <typename T>
KPG_HD AdamCoefficients<T> adam_coefficients(double beta1, double beta2, double eps,
                                             double weight_decay, double lr, double step,
                                             double grad_scale) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  const T one_minus_beta1 = T(1.0 - beta1);
  return {T(grad_scale),
          T(weight_decay),
          T(1.0 - lr * weight_decay),
          one_minus_beta1,
          T(beta2),
          T(1.0 - beta2),
          T(::sqrt(bias_correction2)),
          T(eps),
          T(-(lr / bias_correction1)),
          (one_minus_beta1 < T(0) ? -one_minus_beta1 : one_minus_beta1) < T(0.5)};
}

template <typename T>
KPG_HD void adam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                         const AdamCoefficients<T>& c, bool maximize, bool has_weight_decay,
                         bool decoupled_weight_decay, bool amsgrad) {
  grad = adam_family_gradient(param, grad, c, maximize, has_weight_decay, decoupled_weight_decay);
  adam_family_moments(exp_avg, exp_avg_sq, grad, c);
  T second_moment = exp_avg_sq;
  if (amsgrad) {
    max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = math_sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param = param + c.neg_step_size * exp_avg / denom;
}

// ---- RMSprop: torch.optim.rmsprop._single_tensor_rmsprop ---------------------------------------
template <typename T>
struct RMSpropCoefficients {
  T grad_scale, weight_decay, alpha, one_minus_alpha, eps, momentum, neg_lr;
  bool one_minus_alpha_is_small;
};

template <typename T>
KPG_HD RMSpropCoefficients<T> rmsprop_coefficients(double alpha, double eps, double weight_decay,
                                                   double momentum, double lr, double grad_scale) {
  const T one_minus_alpha = T(1.0 - alpha);
  return {T(grad_scale), T(weight_decay),
          T(alpha),      one_minus_alpha,
          T(eps),        T(momentum),
          T(-lr),        (one_minus_alpha < T(0) ? -one_minus_alpha : one_minus_alpha) < T(0.5)};
}

template <typename T>
KPG_HD void rmsprop_element(T& param, T grad, T& square_avg, T& momentum_buffer, T& grad_avg,
                            const RMSpropCoefficients<T>& c, bool maximize, bool has_weight_decay,
                            bool centered, bool has_momentum) {
  grad = grad * c.grad_scale;
  if (maximize) grad = -grad;
  if (has_weight_decay) grad = grad + c.weight_decay * param;
  square_avg = square_avg * c.alpha + c.one_minus_alpha * grad * grad;
  T avg;
  if (centered) {
    grad_avg = lerp(grad_avg, grad, c.one_minus_alpha, c.one_minus_alpha_is_small);
    avg = math_sqrt(square_avg + T(-1) * grad_avg * grad_avg);
  } else {
    avg = math_sqrt(square_avg);
  }
  avg = avg + c.eps;
  if (has_momentum) {
    momentum_buffer = momentum_buffer * c.momentum + grad / avg;
    param = param + c.neg_lr * momentum_buffer;
  } else {
    param = param + c.neg_lr * grad / avg;
  }
}

// ---- Adagrad: torch.optim.adagrad._single_tensor_adagrad (dense gradients) --------------------
template <typename T>
struct AdagradCoefficients {
  T grad_scale, weight_decay, eps, neg_clr;
};

// step: the step being taken, counted from 1, as torch's state["step"] after its increment.
template <typename T>
KPG_HD AdagradCoefficients<T> adagrad_coefficients(double lr_decay, double weight_decay, double eps,
                                                   double lr, double step, double grad_scale) {
  const double clr = lr / (1.0 + (step - 1.0) * lr_decay);
  return {T(grad_scale), T(weight_decay), T(eps), T(-clr)};
}

template <typename T>
KPG_HD void adagrad_element(T& param, T grad, T& state_sum, const AdagradCoefficients<T>& c,
                            bool maximize, bool has_weight_decay) {
  grad = grad * c.grad_scale;
  if (maximize) grad = -grad;
  if (has_weight_decay) grad = grad + c.weight_decay * param;
  state_sum = state_sum + grad * grad;
  const T std = math_sqrt(state_sum) + c.eps;
  param = param + c.neg_clr * grad / std;
}

// ---- NAdam: torch.optim.nadam._single_tensor_nadam -------------------------------------------
// The momentum coefficient mu of step `step` (counted from 1): torch's Python-float expression.
KPG_HD double nadam_mu(double beta1, double momentum_decay, double step) {
  return beta1 * (1.0 - 0.5 * ::pow(0.96, step * momentum_decay));
}

template <typename T>
struct NAdamCoefficients {
  T grad_scale, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
      bias_correction2, eps, grad_coefficient, exp_avg_coefficient;
  bool beta1_weight_is_small;
};

// mu_product: the product of every step's mu up to and including this one (NOTE [Scalar state] in
// optimizers.h), as torch reads it back from its 0-dim tensor.
template <typename T>
KPG_HD NAdamCoefficients<T> nadam_coefficients(double beta1, double beta2, double eps,
                                               double weight_decay, double momentum_decay,
                                               double mu_product, double lr, double step,
                                               double grad_scale) {
  const double mu = nadam_mu(beta1, momentum_decay, step);
  const double mu_next = nadam_mu(beta1, momentum_decay, step + 1.0);
  const double mu_product_next = mu_product * mu_next;
  const T one_minus_beta1 = T(1.0 - beta1);
  return {T(grad_scale),
          T(weight_decay),
          T(1.0 - lr * weight_decay),
          one_minus_beta1,
          T(beta2),
          T(1.0 - beta2),
          T(1.0 - ::pow(beta2, step)),
          T(eps),
          T(-lr * (1.0 - mu) / (1.0 - mu_product)),
          T((-lr * mu_next) / (1.0 - mu_product_next)),
          (one_minus_beta1 < T(0) ? -one_minus_beta1 : one_minus_beta1) < T(0.5)};
}

template <typename T>
KPG_HD void nadam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                          const NAdamCoefficients<T>& c, bool maximize, bool has_weight_decay,
                          bool decoupled_weight_decay) {
  grad = adam_family_gradient(param, grad, c, maximize, has_weight_decay, decoupled_weight_decay);
  adam_family_moments(exp_avg, exp_avg_sq, grad, c);
  const T denom = math_sqrt(exp_avg_sq / c.bias_correction2) + c.eps;
  param = param + c.grad_coefficient * grad / denom;
  param = param + c.exp_avg_coefficient * exp_avg / denom;
}

// ---- RAdam: torch.optim.radam._single_tensor_radam -------------------------------------------
template <typename T>
struct RAdamCoefficients {
  T grad_scale, weight_decay, decay_factor, one_minus_beta1, beta2, one_minus_beta2,
      bias_correction1, eps, lr, bias_correction2_sqrt, rect;
  bool beta1_weight_is_small;
  bool rectified;  // the variance is tractable (rho_t > 5): the adaptive step
};

template <typename T>
KPG_HD RAdamCoefficients<T> radam_coefficients(double beta1, double beta2, double eps,
                                               double weight_decay, double lr, double step,
                                               double grad_scale) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
  const double rho_t = rho_inf - 2.0 * step * ::pow(beta2, step) / bias_correction2;
  const bool rectified = rho_t > 5.0;
  const double rect = rectified ? ::sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf /
                                         ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
                                : 0.0;
  const T one_minus_beta1 = T(1.0 - beta1);
  return {T(grad_scale),
          T(weight_decay),
          T(1.0 - lr * weight_decay),
          one_minus_beta1,
          T(beta2),
          T(1.0 - beta2),
          T(bias_correction1),
          T(eps),
          T(lr),
          T(::sqrt(bias_correction2)),
          T(rect),
          (one_minus_beta1 < T(0) ? -one_minus_beta1 : one_minus_beta1) < T(0.5),
          rectified};
}

template <typename T>
KPG_HD void radam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                          const RAdamCoefficients<T>& c, bool maximize, bool has_weight_decay,
                          bool decoupled_weight_decay) {
  grad = adam_family_gradient(param, grad, c, maximize, has_weight_decay, decoupled_weight_decay);
  adam_family_moments(exp_avg, exp_avg_sq, grad, c);
  const T bias_corrected_exp_avg = exp_avg / c.bias_correction1;
  T update = bias_corrected_exp_avg * c.lr;
  if (c.rectified) {
    // torch divides a Python float by a tensor as the tensor's reciprocal times the float.
    const T adaptive_lr = (T(1) / (math_sqrt(exp_avg_sq) + c.eps)) * c.bias_correction2_sqrt;
    update = update * adaptive_lr * c.rect;
  }
  param = param - update;
}

}  // namespace kpg
