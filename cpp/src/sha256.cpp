// SHA-256 (PicoSHA2) and verify_files; see promptseg/sha256.hpp.
#include "promptseg/sha256.hpp"

#include <algorithm>
#include <fstream>
#include <vector>

namespace promptseg {

void Sha256::update(const void* data, std::size_t size) {
  // PicoSHA2 counts the length in 16-bit digits from a word_t per call: feed it bounded pieces.
  constexpr std::size_t kPiece = std::size_t{1} << 20;
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t done = 0; done < size; done += kPiece) {
    const std::size_t n = std::min(kPiece, size - done);
    hasher_.process(bytes + done, bytes + done + n);
  }
}

std::array<std::uint8_t, 32> Sha256::digest() {
  if (!finished_) {
    hasher_.finish();
    finished_ = true;
  }
  std::array<std::uint8_t, 32> out{};
  hasher_.get_hash_bytes(out.begin(), out.end());
  return out;
}

std::string Sha256::hexdigest() {
  const std::array<std::uint8_t, 32> bytes = digest();
  return picosha2::bytes_to_hex_string(bytes.begin(), bytes.end());
}

std::string sha256_hex(std::string_view data) {
  Sha256 h;
  h.update(data.data(), data.size());
  return h.hexdigest();
}

std::string sha256_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw Error(file.string() + ": cannot open for hashing");
  }
  Sha256 h;
  std::vector<char> chunk(1 << 16);
  while (in) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    std::streamsize got = in.gcount();
    if (got > 0) {
      h.update(chunk.data(), static_cast<std::size_t>(got));
    }
  }
  if (in.bad()) {
    throw Error(file.string() + ": read error while hashing");
  }
  return h.hexdigest();
}

std::vector<FileEntry> verify_files(const Manifest& manifest) {
  check_files_present(manifest);
  for (const FileEntry& e : manifest.files) {
    std::filesystem::path p = manifest.engine_dir / e.name;
    std::string actual = sha256_file(p);
    if (actual != e.sha256) {
      throw Error(p.string() + ": sha256 mismatch (" + manifest.path.string() + " lists " +
                  e.sha256 + ", the file has " + actual + ")");
    }
  }
  return manifest.files;
}

std::vector<FileEntry> verify_files(const std::filesystem::path& engine_dir) {
  return verify_files(read_manifest(engine_dir));
}

}  // namespace promptseg
