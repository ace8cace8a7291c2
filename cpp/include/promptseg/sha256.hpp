// promptseg C++ host: SHA-256 through PicoSHA2 (vendored in cpp/third_party/picosha2) and the
// manifest's file-hash check.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <picosha2.h>

#include "promptseg/manifest.hpp"

namespace promptseg {

/// Incremental SHA-256.
class Sha256 {
 public:
  Sha256() = default;
  void update(const void* data, std::size_t size);
  /// The 32-byte digest; the object must not be updated afterwards.
  std::array<std::uint8_t, 32> digest();
  /// The digest as 64 lowercase hex digits.
  std::string hexdigest();

 private:
  picosha2::hash256_one_by_one hasher_;
  bool finished_ = false;
};

/// SHA-256 of bytes in memory, as 64 lowercase hex digits.
std::string sha256_hex(std::string_view data);

/// SHA-256 of a file (read in chunks), as 64 lowercase hex digits; throws Error naming it.
std::string sha256_file(const std::filesystem::path& file);

/// Check every file listed in the manifest: present, listed size, listed sha256.
///
/// Throws Error("<file>: sha256 mismatch ...") naming the first bad file; returns the
/// entries that were checked.
std::vector<FileEntry> verify_files(const Manifest& manifest);

/// read_manifest(engine_dir), then verify_files.
std::vector<FileEntry> verify_files(const std::filesystem::path& engine_dir);

}  // namespace promptseg
