// Each optimizer described once: one traits type per kernel family says which hyperparameters it
// reads (the per-agent row, in order), which state tensors it keeps and when each is live (stated
// once, on its flags), which per-parameter scalar state it keeps beyond the step count (NAdam's
// mu_product) and how a step advances it, the flags its element loop is specialised on, and its
// per-element update (optim_math.h). The CPU
// loop (update_cpu.cpp), the CUDA kernel (update_cuda.cu), the bindings and through them kpg's
// Python side (kpg/_ops.py, kpg/optim.py) read everything from here (NOTE [Hyperparameter rows]).
//
// NOTE [Hyperparameter rows]: hyperparameters live in torch's param_groups, one group per agent,
// and reach the kernels every step as one float64 row per agent ([agents, row width], booleans as
// 0/1), so edits, schedulers and loaded state dicts act at the next step, agent by agent. A group
// key of width 2 (Adam's betas) fills two consecutive row entries.
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kpg/optim_math.h"

namespace kpg {

constexpr int kMaxStates = 3;  // state tensors per optimizer; UpdateBuffers::state has this many
constexpr int kMaxFlags = 8;   // flags an element loop is specialised on
constexpr int kMaxScalarStates =
    1;  // per-parameter scalar states; UpdateBuffers::scalars has this many

// How a hyperparameter is checked (torch.optim's rules): any finite value, a finite value >= 0,
// a fraction in [0, 1) (betas), or a flag (0 or 1).
enum class HyperKind : int { Real = 0, NonNegative = 1, Fraction = 2, Flag = 3 };

struct HyperSpec {
  const char* name;  // the param_groups key
  int width;         // row entries it fills: 1, or 2 for a pair such as betas
  HyperKind kind;
  double defaults[2];
};

// The flags of one chunk as compile-time constants (the CPU loop, specialised per combination) or
// as runtime values (the CUDA kernel); the element functions read both the same way, f[index].
template <bool... B>
struct StaticFlags {
  KPG_HD constexpr bool operator[](int index) const {
    constexpr bool values[] = {B..., false};
    return values[index];
  }
};

struct RuntimeFlags {
  bool values[kMaxFlags];
  KPG_HD bool operator[](int index) const { return values[index]; }
};

// What the element loops need per agent besides the row.
struct AgentScalars {
  double lr;
  double step;                       // the step being taken, counted from 1
  double grad_scale;                 // clipping multiplier
  double scalars[kMaxScalarStates];  // the scalar state as this step leaves it (advance_scalars)
};

// A per-parameter scalar state beyond the step count, as torch.optim keeps it: a 0-dim tensor of
// torch's scalar dtype (float32 unless the default dtype is float64), updated at every step before
// the step reads it (NOTE [Scalar state]).
struct ScalarStateSpec {
  const char* name;  // the torch.optim state key
  double initial;    // its value before the first step
};

// What most traits types share: no scalar state, and no rule between hyperparameters beyond each
// one's own range. A traits type overrides what it needs.
struct TraitsDefaults {
  static constexpr std::array<ScalarStateSpec, 0> kScalarStates{};
  // NOTE [Scalar state]: advance_scalars turns the scalar state before a step into the one after
  // it, in S, the scalar state's type, operation by operation as torch does on its 0-dim tensors;
  // the element loops read the result (AgentScalars::scalars), a commit stores it.
  template <typename S>
  KPG_HD static void advance_scalars(const double*, double, S*) {}
  static const char* invalid(const double*) { return nullptr; }
};

template <typename Traits>
constexpr int kNumScalarStates = static_cast<int>(Traits::kScalarStates.size());

// Whether a commit with `row` keeps state tensor `state`: what its flags use (uses_state). Which
// states are live depends on the row alone, never on the live table, which the flags also read.
template <typename Traits>
KPG_HD bool keeps_state(const double* row, int state) {
  RuntimeFlags f{};
  const uint8_t nothing_live[kMaxStates] = {};
  Traits::flags(row, nothing_live, f.values);
  return Traits::uses_state(state, f);
}

// ---- SGD: torch.optim.SGD ---------------------------------------------------------------------
struct SGDTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"momentum", 1, HyperKind::NonNegative, {0.0}},
      {"dampening", 1, HyperKind::Real, {0.0}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"nesterov", 1, HyperKind::Flag, {0.0}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kMomentum, kDampening, kWeightDecay, kNesterov, kMaximize, kRowWidth };
  static constexpr const char* kStates[] = {"momentum_buffer"};
  static constexpr int kStateInitial[] = {-1};  // the row entry a state starts at, or -1 for zeros
  static constexpr int kNumStates = 1;
  enum Flag {
    kFlagMaximize,
    kFlagWeightDecay,
    kFlagMomentum,
    kFlagFirst,
    kFlagNesterov,
    kNumFlags
  };

  KPG_HD static void flags(const double* row, const uint8_t* live, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagMomentum] = row[kMomentum] != 0.0;
    f[kFlagFirst] = live[0] == 0;
    f[kFlagNesterov] = row[kNesterov] != 0.0;
  }
  // The momentum buffer holds values once a committed step ran with momentum on; until then torch
  // keeps no buffer and the first step with momentum starts it from the gradient.
  template <typename F>
  KPG_HD static constexpr bool uses_state(int, const F& f) {
    return f[kFlagMomentum];
  }
  static const char* invalid(const double* row) {
    if (row[kNesterov] != 0.0 && (row[kMomentum] <= 0.0 || row[kDampening] != 0.0)) {
      return "Nesterov momentum requires a momentum and zero dampening";
    }
    return nullptr;
  }

  template <typename T>
  using Coefficients = SGDCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return sgd_coefficients<T>(row[kMomentum], row[kDampening], row[kWeightDecay], a.lr,
                               a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    sgd_element(param, grad, state[0], c, f[kFlagMaximize], f[kFlagWeightDecay], f[kFlagMomentum],
                f[kFlagFirst], f[kFlagNesterov]);
  }
};

// ---- Adam / AdamW: torch.optim.Adam, torch.optim.AdamW ----------------------------------------
struct AdamTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"betas", 2, HyperKind::Fraction, {0.9, 0.999}},
      {"eps", 1, HyperKind::NonNegative, {1e-8}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"amsgrad", 1, HyperKind::Flag, {0.0}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
      {"decoupled_weight_decay", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kBeta1, kBeta2, kEps, kWeightDecay, kAmsgrad, kMaximize, kDecoupled, kRowWidth };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr int kStateInitial[] = {-1, -1, -1};
  static constexpr int kNumStates = 3;
  enum Flag { kFlagMaximize, kFlagWeightDecay, kFlagDecoupled, kFlagAmsgrad, kNumFlags };

  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagDecoupled] = row[kDecoupled] != 0.0;
    f[kFlagAmsgrad] = row[kAmsgrad] != 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int state, const F& f) {
    return state < 2 || f[kFlagAmsgrad];
  }

  template <typename T>
  using Coefficients = AdamCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return adam_coefficients<T>(row[kBeta1], row[kBeta2], row[kEps], row[kWeightDecay], a.lr,
                                a.step, a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    adam_element(param, grad, state[0], state[1], state[2], c, f[kFlagMaximize],
                 f[kFlagWeightDecay], f[kFlagDecoupled], f[kFlagAmsgrad]);
  }
};

// ---- RMSprop: torch.optim.RMSprop -------------------------------------------------------------
struct RMSpropTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"alpha", 1, HyperKind::NonNegative, {0.99}},
      {"eps", 1, HyperKind::NonNegative, {1e-8}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"momentum", 1, HyperKind::NonNegative, {0.0}},
      {"centered", 1, HyperKind::Flag, {0.0}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kAlpha, kEps, kWeightDecay, kMomentum, kCentered, kMaximize, kRowWidth };
  static constexpr const char* kStates[] = {"square_avg", "momentum_buffer", "grad_avg"};
  static constexpr int kStateInitial[] = {-1, -1, -1};
  static constexpr int kNumStates = 3;
  enum Flag { kFlagMaximize, kFlagWeightDecay, kFlagCentered, kFlagMomentum, kNumFlags };

  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagCentered] = row[kCentered] != 0.0;
    f[kFlagMomentum] = row[kMomentum] > 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int state, const F& f) {
    return state == 0 || (state == 1 && f[kFlagMomentum]) || (state == 2 && f[kFlagCentered]);
  }

  template <typename T>
  using Coefficients = RMSpropCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return rmsprop_coefficients<T>(row[kAlpha], row[kEps], row[kWeightDecay], row[kMomentum], a.lr,
                                   a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    rmsprop_element(param, grad, state[0], state[1], state[2], c, f[kFlagMaximize],
                    f[kFlagWeightDecay], f[kFlagCentered], f[kFlagMomentum]);
  }
};

// ---- Adagrad: torch.optim.Adagrad (dense gradients) --------------------------------------------
struct AdagradTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"lr_decay", 1, HyperKind::NonNegative, {0.0}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"initial_accumulator_value", 1, HyperKind::NonNegative, {0.0}},
      {"eps", 1, HyperKind::NonNegative, {1e-10}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kLrDecay, kWeightDecay, kInitialAccumulator, kEps, kMaximize, kRowWidth };
  static constexpr const char* kStates[] = {"sum"};
  static constexpr int kStateInitial[] = {kInitialAccumulator};
  static constexpr int kNumStates = 1;
  enum Flag { kFlagMaximize, kFlagWeightDecay, kNumFlags };

  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int, const F&) {
    return true;
  }

  template <typename T>
  using Coefficients = AdagradCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return adagrad_coefficients<T>(row[kLrDecay], row[kWeightDecay], row[kEps], a.lr, a.step,
                                   a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    adagrad_element(param, grad, state[0], c, f[kFlagMaximize], f[kFlagWeightDecay]);
  }
};

// ---- NAdam: torch.optim.NAdam -----------------------------------------------------------------
struct NAdamTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"betas", 2, HyperKind::Fraction, {0.9, 0.999}},
      {"eps", 1, HyperKind::NonNegative, {1e-8}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"momentum_decay", 1, HyperKind::NonNegative, {4e-3}},
      {"decoupled_weight_decay", 1, HyperKind::Flag, {0.0}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kBeta1, kBeta2, kEps, kWeightDecay, kMomentumDecay, kDecoupled, kMaximize, kRowWidth };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  static constexpr int kStateInitial[] = {-1, -1};
  static constexpr int kNumStates = 2;
  static constexpr std::array<ScalarStateSpec, 1> kScalarStates{{{"mu_product", 1.0}}};
  enum Scalar { kMuProduct };
  enum Flag { kFlagMaximize, kFlagWeightDecay, kFlagDecoupled, kNumFlags };

  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagDecoupled] = row[kDecoupled] != 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int, const F&) {
    return true;
  }
  template <typename S>
  KPG_HD static void advance_scalars(const double* row, double step, S* scalars) {
    scalars[kMuProduct] = scalars[kMuProduct] * S(nadam_mu(row[kBeta1], row[kMomentumDecay], step));
  }

  template <typename T>
  using Coefficients = NAdamCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return nadam_coefficients<T>(row[kBeta1], row[kBeta2], row[kEps], row[kWeightDecay],
                                 row[kMomentumDecay], a.scalars[kMuProduct], a.lr, a.step,
                                 a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    nadam_element(param, grad, state[0], state[1], c, f[kFlagMaximize], f[kFlagWeightDecay],
                  f[kFlagDecoupled]);
  }
};

// ---- RAdam: torch.optim.RAdam -----------------------------------------------------------------
struct RAdamTraits : TraitsDefaults {
  static constexpr HyperSpec kHyper[] = {
      {"betas", 2, HyperKind::Fraction, {0.9, 0.999}},
      {"eps", 1, HyperKind::NonNegative, {1e-8}},
      {"weight_decay", 1, HyperKind::NonNegative, {0.0}},
      {"decoupled_weight_decay", 1, HyperKind::Flag, {0.0}},
      {"maximize", 1, HyperKind::Flag, {0.0}},
  };
  enum Row { kBeta1, kBeta2, kEps, kWeightDecay, kDecoupled, kMaximize, kRowWidth };
  static constexpr const char* kStates[] = {"exp_avg", "exp_avg_sq"};
  static constexpr int kStateInitial[] = {-1, -1};
  static constexpr int kNumStates = 2;
  enum Flag { kFlagMaximize, kFlagWeightDecay, kFlagDecoupled, kNumFlags };

  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagDecoupled] = row[kDecoupled] != 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int, const F&) {
    return true;
  }

  template <typename T>
  using Coefficients = RAdamCoefficients<T>;
  template <typename T>
  KPG_HD static Coefficients<T> coefficients(const double* row, const AgentScalars& a) {
    return radam_coefficients<T>(row[kBeta1], row[kBeta2], row[kEps], row[kWeightDecay], a.lr,
                                 a.step, a.grad_scale);
  }
  template <typename T, typename F>
  KPG_HD static void element(T& param, T grad, T* state, const Coefficients<T>& c, const F& f) {
    radam_element(param, grad, state[0], state[1], c, f[kFlagMaximize], f[kFlagWeightDecay],
                  f[kFlagDecoupled]);
  }
};

// ---- The table: one entry per torch.optim optimizer kpg offers ---------------------------------
enum class Family : int { SGD = 0, Adam = 1, RMSprop = 2, Adagrad = 3, NAdam = 4, RAdam = 5 };
constexpr int kNumFamilies = 6;

// Calls fn(Traits{}) for a family code; the error lists the codes.
template <typename Fn>
decltype(auto) dispatch_family(int family, const char* op, Fn&& fn) {
  switch (static_cast<Family>(family)) {
    case Family::SGD:
      return fn(SGDTraits{});
    case Family::Adam:
      return fn(AdamTraits{});
    case Family::RMSprop:
      return fn(RMSpropTraits{});
    case Family::Adagrad:
      return fn(AdagradTraits{});
    case Family::NAdam:
      return fn(NAdamTraits{});
    case Family::RAdam:
      return fn(RAdamTraits{});
  }
  throw std::invalid_argument(std::string(op) + ": unknown optimizer family code " +
                              std::to_string(family) + "; valid codes are 0 to " +
                              std::to_string(kNumFamilies - 1));
}

struct DefaultOverride {
  const char* name;
  double value;
};

// A named optimizer: its family, torch.optim's default lr, and the defaults that differ from the
// family's (AdamW is Adam with decoupled weight decay of 1e-2).
struct OptimizerEntry {
  const char* name;
  Family family;
  double default_lr;
  DefaultOverride overrides[2];
};

constexpr OptimizerEntry kOptimizers[] = {
    {"sgd", Family::SGD, 1e-3, {}},
    {"adam", Family::Adam, 1e-3, {}},
    {"adamw", Family::Adam, 1e-3, {{"weight_decay", 1e-2}, {"decoupled_weight_decay", 1.0}}},
    {"rmsprop", Family::RMSprop, 1e-2, {}},
    {"adagrad", Family::Adagrad, 1e-2, {}},
    {"nadam", Family::NAdam, 2e-3, {}},
    {"radam", Family::RAdam, 1e-3, {}},
};

}  // namespace kpg
