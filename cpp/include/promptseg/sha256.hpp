// promptseg C++ host: SHA-256 (FIPS 180-4) and the manifest's file-hash check.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "promptseg/manifest.hpp"

namespace promptseg {

/// Incremental SHA-256.
class Sha256 {
 public:
  Sha256() noexcept;
  void update(const void* data, std::size_t size) noexcept;
  /// The 32-byte digest; the object must not be updated afterwards.
  std::array<std::uint8_t, 32> digest() noexcept;
  /// The digest as 64 lowercase hex digits.
  std::string hexdigest() noexcept;

 private:
  void block(const std::uint8_t* data) noexcept;

  std::array<std::uint32_t, 8> state_;
  std::array<std::uint8_t, 64> buffer_{};
  std::size_t buffered_ = 0;
  std::uint64_t length_ = 0;  // bytes
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
