// promptseg C++ host: the presence gate of engines whose image graph has a second output
// ``presence`` [N, 1] (one presence logit per slice), as promptseg.runtime applies it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "promptseg/manifest.hpp"

namespace promptseg {

/// The logistic function in float32, computed as promptseg.preprocess.sigmoid (no overflow for
/// either sign).
float sigmoid(float x) noexcept;

/// How a host chooses the presence threshold tau (``--presence-threshold``,
/// ``--no-presence-gate`` of promptseg-run).
struct PresenceOptions {
  bool gate = true;                 ///< false: keep every slice's mask
  std::optional<double> threshold;  ///< one tau in [0, 1] for every target, over the manifest's
};

/// The tau that applies to ``target``: nullopt with the gate off; the override when given;
/// otherwise the manifest's presence_thresholds entry (nullopt when it has none for the target,
/// i.e. no gate). Throws Error when the override is outside [0, 1].
std::optional<double> presence_tau(const Manifest& manifest, const std::string& target,
                                   const PresenceOptions& options);

/// What the gate did for one prompt (promptseg.runtime.slices.Presence).
struct PresenceGate {
  std::vector<float> probabilities;  ///< sigmoid(presence logit) per slice; empty: no output
  std::optional<double> threshold;   ///< the tau applied (nullopt: no output, gate off, no tau)
  std::size_t slices_gated = 0;      ///< slices whose mask the gate emptied
  bool present = false;              ///< the mask has at least one pixel after the gate

  /// Highest probability over the slices, or nullopt without a presence output.
  std::optional<float> max_probability() const;
};

/// Apply the gate to ``mask`` (N slices of ``plane`` bytes, 0 or 1) in place: a slice whose
/// sigmoid(presence logit) < tau (compared in float32, as numpy does) becomes all 0.
///
/// ``presence_logits`` holds N values, or none for an engine without the output (nothing is
/// gated then). Throws Error when it holds another number of values.
PresenceGate apply_presence_gate(const std::vector<float>& presence_logits,
                                 std::optional<double> tau, std::vector<std::uint8_t>& mask,
                                 std::size_t plane);

}  // namespace promptseg
