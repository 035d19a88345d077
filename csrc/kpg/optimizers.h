// Each optimizer described once: one traits type per kernel family says which hyperparameters it
// reads (the per-agent row, in order), which state tensors it keeps and when each is live, the
// flags its element loop is specialised on, and its per-element update (optim_math.h). The CPU
// loop (update_cpu.cpp), the CUDA kernel (update_cuda.cu), the bindings and through them kpg's
// Python side (kpg/_ops.py, kpg/optim.py) read everything from here (NOTE [Hyperparameter rows]).
//
// NOTE [Hyperparameter rows]: hyperparameters live in torch's param_groups, one group per agent,
// and reach the kernels every step as one float64 row per agent ([agents, row width], booleans as
// 0/1), so edits, schedulers and loaded state dicts act at the next step, agent by agent. A group
// key of width 2 (Adam's betas) fills two consecutive row entries.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kpg/optim_math.h"

namespace kpg {

constexpr int kMaxStates = 3;  // state tensors per optimizer; UpdateBuffers::state has this many
constexpr int kMaxFlags = 8;   // flags an element loop is specialised on

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
  double step;        // the step being taken, counted from 1
  double grad_scale;  // clipping multiplier
};

// ---- SGD: torch.optim.SGD ---------------------------------------------------------------------
struct SGDTraits {
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

  // The momentum buffer holds values once a committed step ran with momentum on; until then torch
  // keeps no buffer and the first step with momentum starts it from the gradient.
  KPG_HD static bool keeps_state(const double* row, int) { return row[kMomentum] != 0.0; }
  KPG_HD static void flags(const double* row, const uint8_t* live, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
    f[kFlagMomentum] = row[kMomentum] != 0.0;
    f[kFlagFirst] = live[0] == 0;
    f[kFlagNesterov] = row[kNesterov] != 0.0;
  }
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
struct AdamTraits {
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

  KPG_HD static bool keeps_state(const double* row, int state) {
    return state < 2 || row[kAmsgrad] != 0.0;
  }
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
  static const char* invalid(const double*) { return nullptr; }

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
struct RMSpropTraits {
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

  KPG_HD static bool keeps_state(const double* row, int state) {
    return state == 0 || (state == 1 && row[kMomentum] > 0.0) ||
           (state == 2 && row[kCentered] != 0.0);
  }
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
  static const char* invalid(const double*) { return nullptr; }

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
struct AdagradTraits {
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

  KPG_HD static bool keeps_state(const double*, int) { return true; }
  KPG_HD static void flags(const double* row, const uint8_t*, bool* f) {
    f[kFlagMaximize] = row[kMaximize] != 0.0;
    f[kFlagWeightDecay] = row[kWeightDecay] != 0.0;
  }
  template <typename F>
  KPG_HD static constexpr bool uses_state(int, const F&) {
    return true;
  }
  static const char* invalid(const double*) { return nullptr; }

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

// ---- The table: one entry per torch.optim optimizer kpg offers ---------------------------------
enum class Family : int { SGD = 0, Adam = 1, RMSprop = 2, Adagrad = 3 };
constexpr int kNumFamilies = 4;

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
};

}  // namespace kpg
