// promptseg C++ host: manifest.json of an engine folder (docs/engine_format.md).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "promptseg/json.hpp"

namespace promptseg {

/// One dimension of an I/O shape: a number, or a symbol such as "N" for the dynamic batch.
struct Dim {
  std::int64_t value = -1;  ///< -1 when symbolic
  std::string symbol;       ///< empty when numeric

  bool is_dynamic() const noexcept { return value < 0; }
};

/// An input or output of the image graph, e.g. image float32 [N, 1, R, R].
struct TensorSpec {
  std::string name;
  std::vector<Dim> shape;
  std::string dtype;
};

/// One named segment of the packed FiLM vector: values [offset, offset + size).
struct FilmSegment {
  std::string name;
  std::int64_t offset = 0;
  std::int64_t size = 0;
};

/// Intensity normalisation a host applies before the image graph (see cpp/README.md).
struct Preprocessing {
  std::int64_t resolution = 0;
  double ct_window[2] = {0.0, 0.0};       ///< HU mapped to 0 and 1 (clipped)
  double mr_percentiles[2] = {0.0, 0.0};  ///< volume percentiles mapped to 0 and 1 (clipped)
  std::string orientation;                ///< axcodes of (rows, columns, slices), e.g. "LAS"
  std::vector<std::string> modalities;    ///< e.g. ct, mr, uint8
};

/// The serialized TensorRT engine, present only where one was built.
struct TensorRTInfo {
  std::string version;
  std::string gpu;
  std::string plan;  ///< file name inside the engine folder, e.g. model.plan
  std::int64_t max_batch = 0;
};

/// A file the manifest vouches for.
struct FileEntry {
  std::string name;  ///< relative to the engine folder
  std::string sha256;
  std::int64_t bytes = -1;  ///< -1 when the manifest gives no size
};

/// Everything a host needs from manifest.json.
struct Manifest {
  std::filesystem::path engine_dir;
  std::filesystem::path path;  ///< engine_dir / "manifest.json"
  std::string format;          ///< "promptseg-engine"
  std::int64_t version = 0;    ///< 1
  std::int64_t resolution = 0;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::int64_t film_dim = 0;
  std::int64_t embed_dim = 0;
  std::vector<FilmSegment> film_layout;
  Preprocessing preprocessing;
  std::string axcodes;  ///< orientation.axcodes
  std::vector<std::string> targets;
  /// presence_thresholds: target -> tau in [0, 1]; a slice whose sigmoid(presence) < tau gets
  /// an empty mask. Empty when the manifest records none (older exports).
  std::map<std::string, double> presence_thresholds;
  std::map<std::string, std::string> graphs;  ///< precision -> file, e.g. fp32 -> model.onnx
  std::optional<TensorRTInfo> tensorrt;
  std::vector<FileEntry> files;  ///< in manifest order
  json::Value raw;               ///< the whole document

  /// The input or output called ``name``, or nullptr.
  const TensorSpec* input(const std::string& name) const noexcept;
  const TensorSpec* output(const std::string& name) const noexcept;
  /// The files entry called ``name``, or nullptr.
  const FileEntry* file(const std::string& name) const noexcept;
  /// Whether the image graph has the optional second output ``presence`` [N, 1] (one presence
  /// logit per slice); older engines have only ``logits``.
  bool has_presence() const noexcept;
  /// tau of ``target`` from presence_thresholds, or nullopt when the manifest has none for it.
  std::optional<double> presence_threshold(const std::string& target) const;
};

/// Output names of the image graph: the mask logits [N, 1, R, R] and, optionally, the
/// presence logits [N, 1].
inline constexpr const char* kLogitsOutput = "logits";
inline constexpr const char* kPresenceOutput = "presence";

/// The manifest's file name inside an engine folder.
inline constexpr const char* kManifestName = "manifest.json";
/// The prompt cache's file name inside an engine folder.
inline constexpr const char* kPromptCacheName = "prompt_cache.safetensors";

/// Read and validate ``engine_dir/manifest.json``.
///
/// Checks format/version, that the FiLM layout tiles [0, film_dim) exactly, that the image
/// input is [N, 1, R, R] and the film input [N, film_dim] where given, that the outputs are
/// logits [N, 1, R, R] and optionally presence [N, 1], that presence thresholds lie in [0, 1],
/// and that file names stay inside the folder. Throws
/// Error("<dir>/manifest.json: field 'x.y': ...") otherwise.
Manifest read_manifest(const std::filesystem::path& engine_dir);

/// Same, from text already in memory (``path`` only names the file in messages).
Manifest parse_manifest(const std::string& text, const std::filesystem::path& path);

/// Every listed file exists (and has the listed size); throws Error naming the first that
/// does not. Cheap: no hashing (see verify_files in sha256.hpp for the hashes).
void check_files_present(const Manifest& manifest);

}  // namespace promptseg
