// The presence gate; see promptseg/presence.hpp.
#include "promptseg/presence.hpp"

#include <algorithm>
#include <cmath>

namespace promptseg {

float sigmoid(float x) noexcept {
  if (x >= 0.0f) {
    return 1.0f / (1.0f + std::exp(-x));
  }
  const float e = std::exp(x);
  return e / (1.0f + e);
}

std::optional<double> presence_tau(const Manifest& manifest, const std::string& target,
                                   const PresenceOptions& options) {
  if (!options.gate) {
    return std::nullopt;
  }
  if (options.threshold) {
    const double tau = *options.threshold;
    if (!(tau >= 0.0 && tau <= 1.0)) {
      throw Error("--presence-threshold must be between 0 and 1, got " + std::to_string(tau));
    }
    return tau;
  }
  return manifest.presence_threshold(target);
}

std::optional<float> PresenceGate::max_probability() const {
  if (probabilities.empty()) {
    return std::nullopt;
  }
  return *std::max_element(probabilities.begin(), probabilities.end());
}

PresenceGate apply_presence_gate(const std::vector<float>& presence_logits,
                                 std::optional<double> tau, std::vector<std::uint8_t>& mask,
                                 std::size_t plane) {
  const std::size_t n = plane == 0 ? 0 : mask.size() / plane;
  if (plane == 0 || mask.size() % plane != 0) {
    throw Error("presence gate: a mask of " + std::to_string(mask.size()) +
                " bytes is not a whole number of " + std::to_string(plane) + "-pixel slices");
  }
  if (!presence_logits.empty() && presence_logits.size() != n) {
    throw Error("presence gate: " + std::to_string(presence_logits.size()) +
                " presence logits for " + std::to_string(n) + " slices");
  }
  PresenceGate gate;
  gate.probabilities.reserve(presence_logits.size());
  for (float logit : presence_logits) {
    gate.probabilities.push_back(sigmoid(logit));
  }
  if (!gate.probabilities.empty() && tau) {
    gate.threshold = tau;
    const auto cut = static_cast<float>(*tau);
    for (std::size_t s = 0; s < n; ++s) {
      if (gate.probabilities[s] < cut) {
        const auto first = mask.begin() + static_cast<std::ptrdiff_t>(s * plane);
        std::fill(first, first + static_cast<std::ptrdiff_t>(plane), std::uint8_t{0});
        ++gate.slices_gated;
      }
    }
  }
  gate.present = std::any_of(mask.begin(), mask.end(), [](std::uint8_t v) { return v != 0; });
  return gate;
}

}  // namespace promptseg
