// promptseg C++ host: safetensors files and the engine's prompt cache.
//
// safetensors layout: 8-byte little-endian header length N, N bytes of JSON header
// ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}),
// then the data section; offsets are relative to its start, tensors are packed without gaps
// and the last one ends at the end of the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "promptseg/error.hpp"

namespace promptseg {

struct Manifest;

/// One tensor's header entry.
struct TensorInfo {
  std::string name;
  std::string dtype;  ///< safetensors code: F32, F16, BF16, I64, U8, ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;  ///< byte offsets into the data section
  std::uint64_t end = 0;

  std::uint64_t numel() const noexcept;
};

/// Bytes per element of a safetensors dtype code, or 0 when unknown.
std::size_t dtype_size(std::string_view dtype) noexcept;

/// A validated safetensors file held in memory.
class SafetensorsFile {
 public:
  /// Read and validate a file; throws Error naming it (truncated, bad header, bad offsets).
  static SafetensorsFile read(const std::filesystem::path& file);
  /// Validate bytes already in memory; ``path`` only names them in messages.
  static SafetensorsFile parse(std::string bytes, const std::filesystem::path& path);

  const std::filesystem::path& path() const noexcept { return path_; }
  /// Tensors in data order.
  const std::vector<TensorInfo>& tensors() const noexcept { return tensors_; }
  /// The tensor called ``name``, or nullptr.
  const TensorInfo* find(std::string_view name) const noexcept;
  /// The tensor called ``name``; throws Error naming the file when absent.
  const TensorInfo& tensor(std::string_view name) const;
  /// The ``__metadata__`` strings (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// One metadata string; throws Error naming the file when absent.
  const std::string& metadata_value(const std::string& key) const;

  /// Raw bytes of a tensor.
  std::string_view bytes(const TensorInfo& tensor) const;
  /// All values of an F32 tensor (little-endian on disk, converted to host order).
  std::vector<float> f32(const TensorInfo& tensor) const;
  /// Row ``row`` of a 2-D F32 tensor: shape[1] values.
  std::vector<float> f32_row(const TensorInfo& tensor, std::size_t row) const;

 private:
  std::filesystem::path path_;
  std::string bytes_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// How a prompt was found in the cache.
struct PromptMatch {
  std::size_t index = 0;  ///< row in film / embedding
  bool exact = true;      ///< false: matched after case and whitespace normalisation
};

/// The second lookup key, as promptseg.runtime's ``normalise_prompt`` for ASCII text:
/// lower-case, collapse runs of whitespace to one space, trim, and drop trailing punctuation
/// ("Where is the Liver ?" -> "where is the liver"). Bytes >= 0x80 are kept as they are (no
/// Unicode case folding; non-ASCII punctuation is not stripped).
std::string normalize_prompt(std::string_view text);

/// prompt_cache.safetensors: K cached prompts with their packed FiLM vectors.
///
/// Tensors ``film`` float32 [K, P] and ``embedding`` float32 [K, E]; metadata strings
/// format=promptseg-prompt-cache, version=1, prompts / targets (JSON lists of K strings),
/// film_dim, embed_dim.
class PromptCache {
 public:
  /// Read and validate; throws Error naming the file.
  static PromptCache open(const std::filesystem::path& file);
  /// Open ``engine_dir/prompt_cache.safetensors`` and check P and E against the manifest.
  static PromptCache open(const Manifest& manifest);

  const std::filesystem::path& path() const noexcept { return file_.path(); }
  const SafetensorsFile& file() const noexcept { return file_; }
  std::size_t size() const noexcept { return prompts_.size(); }
  std::size_t film_dim() const noexcept { return film_dim_; }
  std::size_t embed_dim() const noexcept { return embed_dim_; }
  const std::vector<std::string>& prompts() const noexcept { return prompts_; }
  /// The canonical target of each prompt (same order as prompts()).
  const std::vector<std::string>& targets() const noexcept { return targets_; }
  /// Distinct targets in first-seen order.
  std::vector<std::string> unique_targets() const;

  /// Exact match first, then a case-/whitespace-normalised one; nullopt when unknown.
  std::optional<PromptMatch> find(std::string_view prompt) const;
  /// The FiLM vector (P floats) of a cached prompt; throws Error naming the file and listing
  /// the known targets when the prompt is not cached.
  std::vector<float> film_for(std::string_view prompt) const;
  /// Row ``index`` of film (P floats) / embedding (E floats).
  std::vector<float> film(std::size_t index) const;
  std::vector<float> embedding(std::size_t index) const;

 private:
  SafetensorsFile file_;
  std::vector<std::string> prompts_;
  std::vector<std::string> targets_;
  std::map<std::string, std::size_t> exact_;
  std::map<std::string, std::size_t> normalized_;
  std::size_t film_dim_ = 0;
  std::size_t embed_dim_ = 0;
};

}  // namespace promptseg
