// safetensors reader and prompt cache; see promptseg/safetensors.hpp.
#include "promptseg/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <system_error>
#include <utility>

#include "promptseg/json.hpp"
#include "promptseg/manifest.hpp"

namespace promptseg {

namespace fs = std::filesystem;

namespace {

// safetensors refuses headers above 100 MB; so do we (a corrupt length would ask for more).
constexpr std::uint64_t kMaxHeader = 100'000'000;

bool host_is_little_endian() noexcept {
  const std::uint32_t probe = 1;
  unsigned char first = 0;
  std::memcpy(&first, &probe, 1);
  return first == 1;
}

std::string quote(std::string_view s) { return json::dump(json::Value(std::string(s))); }

/// Element ``i`` of an array when it is written as an integer (safetensors has no 2.0).
std::optional<std::int64_t> integer_at(const json::Value& array, std::size_t i) {
  const json::Value& v = array[i];
  return v.is_number_integer() ? json::exact_integer(v) : std::nullopt;
}

}  // namespace

std::uint64_t TensorInfo::numel() const noexcept {
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    n *= static_cast<std::uint64_t>(d);
  }
  return n;
}

std::size_t dtype_size(std::string_view dtype) noexcept {
  if (dtype == "BOOL" || dtype == "U8" || dtype == "I8" || dtype == "F8_E5M2" ||
      dtype == "F8_E4M3" || dtype == "F8_E8M0") {
    return 1;
  }
  if (dtype == "I16" || dtype == "U16" || dtype == "F16" || dtype == "BF16") {
    return 2;
  }
  if (dtype == "I32" || dtype == "U32" || dtype == "F32") {
    return 4;
  }
  if (dtype == "I64" || dtype == "U64" || dtype == "F64" || dtype == "C64") {
    return 8;
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile SafetensorsFile::read(const fs::path& file) {
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) {
    throw Error(file.string() + ": not found");
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) {
    throw Error(file.string() + ": cannot open");
  }
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return parse(buffer.str(), file);
}

SafetensorsFile SafetensorsFile::parse(std::string bytes, const fs::path& path) {
  const std::string where = path.string() + ": ";
  SafetensorsFile out;
  out.path_ = path;
  out.bytes_ = std::move(bytes);
  const std::string& b = out.bytes_;

  if (b.size() < 8) {
    throw Error(where + "only " + std::to_string(b.size()) +
                " bytes; a safetensors file starts with an 8-byte header length (truncated?)");
  }
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) {
    n = (n << 8) | static_cast<unsigned char>(b[static_cast<std::size_t>(i)]);
  }
  if (n > kMaxHeader) {
    throw Error(where + "header length " + std::to_string(n) + " exceeds the 100 MB limit " +
                "(not a safetensors file?)");
  }
  if (8 + n > b.size()) {
    throw Error(where + "header length " + std::to_string(n) + " runs past the end of the " +
                std::to_string(b.size()) + "-byte file (truncated?)");
  }
  out.data_start_ = static_cast<std::size_t>(8 + n);
  const std::uint64_t data_size = b.size() - out.data_start_;

  json::Value header;
  try {
    header = json::parse(std::string_view(b).substr(8, static_cast<std::size_t>(n)));
  } catch (const json::ParseError& e) {
    throw Error(where + "header: " + e.what());
  }
  if (!header.is_object()) {
    throw Error(where + "header must be a JSON object, got " + json::type_name(header));
  }

  for (const auto& entry : header.items()) {
    const std::string& key = entry.key();
    const json::Value& v = entry.value();
    if (key == "__metadata__") {
      if (!v.is_object()) {
        throw Error(where + "__metadata__ must be an object of strings, got " +
                    json::type_name(v));
      }
      for (const auto& meta : v.items()) {
        if (!meta.value().is_string()) {
          throw Error(where + "__metadata__." + meta.key() + " must be a string, got " +
                      json::type_name(meta.value()));
        }
        out.metadata_[meta.key()] = meta.value().get<std::string>();
      }
      continue;
    }
    const std::string at = where + "tensor " + quote(key) + ": ";
    if (!v.is_object()) {
      throw Error(at + "expected an object, got " + json::type_name(v));
    }
    TensorInfo t;
    t.name = key;
    const json::Value* dtype = json::find(v, "dtype");
    const json::Value* shape = json::find(v, "shape");
    const json::Value* offsets = json::find(v, "data_offsets");
    if (dtype == nullptr || !dtype->is_string()) {
      throw Error(at + "missing string 'dtype'");
    }
    t.dtype = dtype->get<std::string>();
    std::size_t item = dtype_size(t.dtype);
    if (item == 0) {
      throw Error(at + "dtype " + quote(t.dtype) + " is not supported by this reader");
    }
    if (shape == nullptr || !shape->is_array()) {
      throw Error(at + "missing list 'shape'");
    }
    std::uint64_t numel = 1;
    for (std::size_t d = 0; d < shape->size(); ++d) {
      const std::optional<std::int64_t> extent = integer_at(*shape, d);
      if (!extent || *extent < 0) {
        throw Error(at + "shape[" + std::to_string(d) + "] must be an integer >= 0");
      }
      const auto size = static_cast<std::uint64_t>(*extent);
      if (size != 0 && numel > std::numeric_limits<std::uint64_t>::max() / size) {
        throw Error(at + "shape overflows");
      }
      numel *= size;
      t.shape.push_back(*extent);
    }
    const std::optional<std::int64_t> begin =
        offsets != nullptr && offsets->is_array() && offsets->size() == 2
            ? integer_at(*offsets, 0)
            : std::nullopt;
    const std::optional<std::int64_t> end = begin ? integer_at(*offsets, 1) : std::nullopt;
    if (!begin || !end || *begin < 0 || *end < *begin) {
      throw Error(at + "'data_offsets' must be [begin, end] with 0 <= begin <= end");
    }
    t.begin = static_cast<std::uint64_t>(*begin);
    t.end = static_cast<std::uint64_t>(*end);
    const bool overflow = numel > std::numeric_limits<std::uint64_t>::max() / item;
    if (overflow || t.end - t.begin != numel * item) {
      throw Error(at + "data_offsets span " + std::to_string(t.end - t.begin) + " bytes, " +
                  t.dtype + " shape needs " + std::to_string(numel * item));
    }
    out.tensors_.push_back(std::move(t));
  }

  std::sort(out.tensors_.begin(), out.tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& c) {
              return a.begin != c.begin ? a.begin < c.begin : a.end < c.end;
            });
  std::uint64_t next = 0;
  for (const TensorInfo& t : out.tensors_) {
    if (t.begin != next) {
      throw Error(where + "tensor " + quote(t.name) + " starts at byte " +
                  std::to_string(t.begin) + " of the data section, expected " +
                  std::to_string(next) + " (tensors must be packed without gaps or overlaps)");
    }
    next = t.end;
  }
  if (next != data_size) {
    throw Error(where + "data section is " + std::to_string(data_size) + " bytes, the header " +
                "describes " + std::to_string(next) +
                (next > data_size ? " (truncated?)" : " (trailing bytes?)"));
  }
  return out;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const noexcept {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) {
      return &t;
    }
  }
  return nullptr;
}

const TensorInfo& SafetensorsFile::tensor(std::string_view name) const {
  const TensorInfo* t = find(name);
  if (t == nullptr) {
    std::string names;
    for (const TensorInfo& x : tensors_) {
      names += (names.empty() ? "" : ", ") + x.name;
    }
    throw Error(path_.string() + ": no tensor " + quote(name) + " (has: " +
                (names.empty() ? std::string("none") : names) + ")");
  }
  return *t;
}

const std::string& SafetensorsFile::metadata_value(const std::string& key) const {
  auto it = metadata_.find(key);
  if (it == metadata_.end()) {
    throw Error(path_.string() + ": __metadata__ has no " + quote(key));
  }
  return it->second;
}

std::string_view SafetensorsFile::bytes(const TensorInfo& tensor) const {
  return std::string_view(bytes_).substr(data_start_ + static_cast<std::size_t>(tensor.begin),
                                         static_cast<std::size_t>(tensor.end - tensor.begin));
}

std::vector<float> SafetensorsFile::f32(const TensorInfo& tensor) const {
  if (tensor.dtype != "F32") {
    throw Error(path_.string() + ": tensor " + quote(tensor.name) + " is " + tensor.dtype +
                ", expected F32");
  }
  std::string_view raw = bytes(tensor);
  std::vector<float> out(raw.size() / 4);
  if (host_is_little_endian()) {
    std::memcpy(out.data(), raw.data(), raw.size());
  } else {
    for (std::size_t i = 0; i < out.size(); ++i) {
      unsigned char le[4];
      unsigned char be[4];
      std::memcpy(le, raw.data() + 4 * i, 4);
      for (int k = 0; k < 4; ++k) {
        be[k] = le[3 - k];
      }
      std::memcpy(&out[i], be, 4);
    }
  }
  return out;
}

std::vector<float> SafetensorsFile::f32_row(const TensorInfo& tensor, std::size_t row) const {
  if (tensor.shape.size() != 2) {
    throw Error(path_.string() + ": tensor " + quote(tensor.name) + " has " +
                std::to_string(tensor.shape.size()) + " dimensions, expected 2");
  }
  auto rows = static_cast<std::size_t>(tensor.shape[0]);
  auto cols = static_cast<std::size_t>(tensor.shape[1]);
  if (row >= rows) {
    throw Error(path_.string() + ": row " + std::to_string(row) + " of tensor " +
                quote(tensor.name) + " out of range (" + std::to_string(rows) + " rows)");
  }
  TensorInfo slice = tensor;
  slice.begin = tensor.begin + row * cols * 4;
  slice.end = slice.begin + cols * 4;
  slice.shape = {static_cast<std::int64_t>(cols)};
  return f32(slice);
}

// ---------------------------------------------------------------------------------------------
// PromptCache

std::string normalize_prompt(std::string_view text) {
  std::string out;
  bool pending_space = false;
  for (char c : text) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) {
      out += ' ';
      pending_space = false;
    }
    out += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
  }
  // Trailing punctuation: the ASCII characters of Unicode category P.
  static constexpr std::string_view kPunctuation = "!\"#%&'()*,-./:;?@[\\]_{}";
  while (!out.empty() &&
         (out.back() == ' ' || kPunctuation.find(out.back()) != std::string_view::npos)) {
    out.pop_back();
  }
  return out;
}

PromptCache PromptCache::open(const fs::path& file) {
  PromptCache cache;
  cache.file_ = SafetensorsFile::read(file);
  const SafetensorsFile& f = cache.file_;
  const std::string where = file.string() + ": ";

  const std::string& format = f.metadata_value("format");
  if (format != "promptseg-prompt-cache") {
    throw Error(where + "__metadata__ format is " + quote(format) +
                ", expected \"promptseg-prompt-cache\"");
  }
  const std::string& version = f.metadata_value("version");
  if (version != "1") {
    throw Error(where + "__metadata__ version is " + quote(version) + ", this host reads \"1\"");
  }
  try {
    cache.prompts_ = json::parse_string_list(f.metadata_value("prompts"));
    cache.targets_ = json::parse_string_list(f.metadata_value("targets"));
  } catch (const Error& e) {
    // metadata_value already names the file; parse errors do not.
    std::string what = e.what();
    throw Error(what.rfind(file.string(), 0) == 0 ? what : where + "__metadata__: " + what);
  }
  if (cache.prompts_.size() != cache.targets_.size()) {
    throw Error(where + "__metadata__ lists " + std::to_string(cache.prompts_.size()) +
                " prompts but " + std::to_string(cache.targets_.size()) + " targets");
  }

  const std::size_t k = cache.prompts_.size();
  auto check_2d = [&](const TensorInfo& t) {
    if (t.dtype != "F32") {
      throw Error(where + "tensor " + quote(t.name) + " is " + t.dtype + ", expected F32");
    }
    if (t.shape.size() != 2 || static_cast<std::size_t>(t.shape[0]) != k) {
      std::string shape;
      for (std::int64_t d : t.shape) {
        shape += (shape.empty() ? "" : ", ") + std::to_string(d);
      }
      throw Error(where + "tensor " + quote(t.name) + " has shape [" + shape + "], expected [" +
                  std::to_string(k) + ", ...] (one row per cached prompt)");
    }
    return static_cast<std::size_t>(t.shape[1]);
  };
  cache.film_dim_ = check_2d(f.tensor("film"));
  cache.embed_dim_ = check_2d(f.tensor("embedding"));
  for (const char* key : {"film_dim", "embed_dim"}) {
    auto it = f.metadata().find(key);
    std::size_t actual = std::string(key) == "film_dim" ? cache.film_dim_ : cache.embed_dim_;
    if (it != f.metadata().end() && it->second != std::to_string(actual)) {
      throw Error(where + "__metadata__ " + key + " is " + quote(it->second) +
                  " but the tensor has " + std::to_string(actual) + " columns");
    }
  }
  for (std::size_t i = 0; i < k; ++i) {
    cache.exact_.emplace(cache.prompts_[i], i);  // first occurrence wins
    cache.normalized_.emplace(normalize_prompt(cache.prompts_[i]), i);
  }
  return cache;
}

PromptCache PromptCache::open(const Manifest& manifest) {
  fs::path file = manifest.engine_dir / kPromptCacheName;
  PromptCache cache = open(file);
  if (static_cast<std::int64_t>(cache.film_dim_) != manifest.film_dim) {
    throw Error(file.string() + ": film has " + std::to_string(cache.film_dim_) + " columns, " +
                manifest.path.string() + " says film_dim " + std::to_string(manifest.film_dim));
  }
  if (static_cast<std::int64_t>(cache.embed_dim_) != manifest.embed_dim) {
    throw Error(file.string() + ": embedding has " + std::to_string(cache.embed_dim_) +
                " columns, " + manifest.path.string() + " says embed_dim " +
                std::to_string(manifest.embed_dim));
  }
  return cache;
}

std::vector<std::string> PromptCache::unique_targets() const {
  std::vector<std::string> out;
  for (const std::string& t : targets_) {
    if (std::find(out.begin(), out.end(), t) == out.end()) {
      out.push_back(t);
    }
  }
  return out;
}

std::optional<PromptMatch> PromptCache::find(std::string_view prompt) const {
  if (auto it = exact_.find(std::string(prompt)); it != exact_.end()) {
    return PromptMatch{it->second, true};
  }
  if (auto it = normalized_.find(normalize_prompt(prompt)); it != normalized_.end()) {
    return PromptMatch{it->second, false};
  }
  return std::nullopt;
}

std::vector<float> PromptCache::film_for(std::string_view prompt) const {
  std::optional<PromptMatch> match = find(prompt);
  if (!match) {
    std::string targets;
    for (const std::string& t : unique_targets()) {
      targets += (targets.empty() ? "" : ", ") + t;
    }
    throw Error(path().string() + ": prompt " + quote(prompt) + " is not among the " +
                std::to_string(size()) + " cached prompts (known targets: " + targets +
                "); prompts outside the cache need text_encoder.onnx and film_generator.onnx, "
                "which this host does not run");
  }
  return film(match->index);
}

std::vector<float> PromptCache::film(std::size_t index) const {
  return file_.f32_row(file_.tensor("film"), index);
}

std::vector<float> PromptCache::embedding(std::size_t index) const {
  return file_.f32_row(file_.tensor("embedding"), index);
}

}  // namespace promptseg
