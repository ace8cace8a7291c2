// manifest.json reader; see promptseg/manifest.hpp.
#include "promptseg/manifest.hpp"

#include <fstream>
#include <optional>
#include <sstream>
#include <system_error>

namespace promptseg {

namespace fs = std::filesystem;

namespace {

/// A member that is present and not null, or nullptr.
const json::Value* optional_member(const json::Value& object, const std::string& key) {
  const json::Value* v = json::find(object, key);
  return v == nullptr || v->is_null() ? nullptr : v;
}

/// Typed field access that names the file and the dotted field path in every error.
class Fields {
 public:
  explicit Fields(const fs::path& file) : file_(file.string()) {}

  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw Error(file_ + ": field '" + field + "': " + what);
  }

  static std::string join(const std::string& parent, const std::string& key) {
    return parent.empty() ? key : parent + "." + key;
  }

  const json::Value& require(const json::Value& object, const std::string& parent,
                             const std::string& key, const char* expected) const {
    const json::Value* v = json::find(object, key);
    if (v == nullptr) {
      fail(join(parent, key), std::string("missing (expected ") + expected + ")");
    }
    return *v;
  }

  std::string string(const json::Value& v, const std::string& field) const {
    if (!v.is_string()) {
      fail(field, std::string("expected a string, got ") + json::type_name(v));
    }
    return v.get<std::string>();
  }

  std::int64_t integer(const json::Value& v, const std::string& field) const {
    if (!v.is_number()) {
      fail(field, std::string("expected an integer, got ") + json::type_name(v));
    }
    std::optional<std::int64_t> n = json::exact_integer(v);
    if (!n) {
      fail(field, "expected an integer, got " + json::dump(v));
    }
    return *n;
  }

  std::int64_t positive(const json::Value& v, const std::string& field) const {
    std::int64_t n = integer(v, field);
    if (n <= 0) {
      fail(field, "expected a positive integer, got " + std::to_string(n));
    }
    return n;
  }

  double number(const json::Value& v, const std::string& field) const {
    if (!v.is_number()) {
      fail(field, std::string("expected a number, got ") + json::type_name(v));
    }
    return v.get<double>();
  }

  void pair(const json::Value& v, const std::string& field, double out[2]) const {
    if (!v.is_array() || v.size() != 2) {
      fail(field, std::string("expected a list of 2 numbers, got ") +
                      (v.is_array() ? "a list of " + std::to_string(v.size())
                                    : std::string(json::type_name(v))));
    }
    out[0] = number(v[0], field + "[0]");
    out[1] = number(v[1], field + "[1]");
  }

  std::vector<std::string> strings(const json::Value& v, const std::string& field) const {
    if (!v.is_array()) {
      fail(field, std::string("expected a list of strings, got ") + json::type_name(v));
    }
    std::vector<std::string> out;
    for (std::size_t i = 0; i < v.size(); ++i) {
      out.push_back(string(v[i], field + "[" + std::to_string(i) + "]"));
    }
    return out;
  }

  const json::Value& object(const json::Value& v, const std::string& field) const {
    if (!v.is_object()) {
      fail(field, std::string("expected an object, got ") + json::type_name(v));
    }
    return v;
  }

  const json::Value& list(const json::Value& v, const std::string& field) const {
    if (!v.is_array()) {
      fail(field, std::string("expected a list, got ") + json::type_name(v));
    }
    return v;
  }

 private:
  std::string file_;
};

std::vector<TensorSpec> tensor_specs(const Fields& f, const json::Value& v,
                                     const std::string& field) {
  f.list(v, field);
  if (v.size() == 0) {
    f.fail(field, "expected at least one tensor, got an empty list");
  }
  std::vector<TensorSpec> out;
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::string at = field + "[" + std::to_string(i) + "]";
    const json::Value& t = f.object(v[i], at);
    TensorSpec spec;
    spec.name = f.string(f.require(t, at, "name", "a string"), at + ".name");
    spec.dtype = f.string(f.require(t, at, "dtype", "a string such as float32"), at + ".dtype");
    const json::Value& shape = f.list(f.require(t, at, "shape", "a list"), at + ".shape");
    for (std::size_t d = 0; d < shape.size(); ++d) {
      std::string dim_at = at + ".shape[" + std::to_string(d) + "]";
      const json::Value& dim = shape[d];
      Dim out_dim;
      if (dim.is_string()) {
        out_dim.symbol = dim.get<std::string>();
      } else if (dim.is_null()) {
        out_dim.symbol = "?";
      } else {
        out_dim.value = f.integer(dim, dim_at);
        if (out_dim.value < 0) {
          out_dim.value = -1;
          out_dim.symbol = "?";
        }
      }
      spec.shape.push_back(out_dim);
    }
    out.push_back(std::move(spec));
  }
  return out;
}

void check_dim(const Fields& f, const TensorSpec& spec, const std::string& field, std::size_t d,
               std::int64_t expected, const std::string& what) {
  const Dim& dim = spec.shape[d];
  if (!dim.is_dynamic() && dim.value != expected) {
    f.fail(field + ".shape[" + std::to_string(d) + "]",
           "expected " + std::to_string(expected) + " (" + what + "), got " +
               std::to_string(dim.value));
  }
}

void check_io(const Fields& f, const Manifest& m) {
  // Names and order as docs/engine_format.schema.json: image, film -> logits[, presence].
  static const char* kInputs[] = {"image", "film"};
  if (m.inputs.size() != 2) {
    f.fail("inputs", "expected [image, film], got " + std::to_string(m.inputs.size()) +
                         " inputs");
  }
  for (std::size_t i = 0; i < 2; ++i) {
    if (m.inputs[i].name != kInputs[i]) {
      f.fail("inputs[" + std::to_string(i) + "].name",
             std::string("expected \"") + kInputs[i] + "\", got \"" + m.inputs[i].name + "\"");
    }
  }
  if (m.outputs.size() > 2 || m.outputs[0].name != kLogitsOutput ||
      (m.outputs.size() == 2 && m.outputs[1].name != kPresenceOutput)) {
    f.fail("outputs", "expected [logits] or [logits, presence], got \"" + m.outputs[0].name +
                          "\" first and " + std::to_string(m.outputs.size()) + " outputs");
  }
  const TensorSpec& logits = m.outputs[0];
  if (logits.shape.size() != 4) {
    f.fail("outputs[0].shape", "logits must be [N, 1, R, R], got " +
                                   std::to_string(logits.shape.size()) + " dimensions");
  }
  check_dim(f, logits, "outputs[0]", 1, 1, "one channel");
  check_dim(f, logits, "outputs[0]", 2, m.resolution, "resolution");
  check_dim(f, logits, "outputs[0]", 3, m.resolution, "resolution");
  if (m.outputs.size() == 2) {
    const TensorSpec& presence = m.outputs[1];
    if (presence.shape.size() != 2) {
      f.fail("outputs[1].shape", "presence must be [N, 1] (one logit per slice), got " +
                                     std::to_string(presence.shape.size()) + " dimensions");
    }
    check_dim(f, presence, "outputs[1]", 1, 1, "one presence logit per slice");
  }
  for (std::size_t i = 0; i < m.inputs.size(); ++i) {
    const TensorSpec& spec = m.inputs[i];
    std::string at = "inputs[" + std::to_string(i) + "]";
    if (spec.name == "image") {
      if (spec.shape.size() != 4) {
        f.fail(at + ".shape", "image must be [N, 1, R, R], got " +
                                  std::to_string(spec.shape.size()) + " dimensions");
      }
      check_dim(f, spec, at, 1, 1, "one channel");
      check_dim(f, spec, at, 2, m.resolution, "resolution");
      check_dim(f, spec, at, 3, m.resolution, "resolution");
    } else if (spec.name == "film") {
      if (spec.shape.size() != 2) {
        f.fail(at + ".shape", "film must be [N, film_dim], got " +
                                  std::to_string(spec.shape.size()) + " dimensions");
      }
      check_dim(f, spec, at, 1, m.film_dim, "film_dim");
    }
  }
}

std::string check_axcodes(const Fields& f, const std::string& codes, const std::string& field) {
  static const char* axes[3][2] = {{"L", "R"}, {"A", "P"}, {"S", "I"}};
  bool used[3] = {false, false, false};
  if (codes.size() != 3) {
    f.fail(field, "expected 3 axis codes such as \"LAS\", got \"" + codes + "\"");
  }
  for (char c : codes) {
    bool ok = false;
    for (int a = 0; a < 3; ++a) {
      if (c == axes[a][0][0] || c == axes[a][1][0]) {
        if (used[a]) {
          f.fail(field, "axis codes \"" + codes + "\" name the same axis twice");
        }
        used[a] = true;
        ok = true;
      }
    }
    if (!ok) {
      f.fail(field, "expected letters from L/R, A/P, S/I, got \"" + codes + "\"");
    }
  }
  return codes;
}

bool is_hex64(std::string& s) {
  if (s.size() != 64) {
    return false;
  }
  for (char& c : s) {
    if (c >= 'A' && c <= 'F') {
      c = static_cast<char>(c - 'A' + 'a');
    }
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
      return false;
    }
  }
  return true;
}

void check_relative(const Fields& f, const std::string& name, const std::string& field) {
  fs::path p(name);
  bool bad = name.empty() || p.is_absolute() || p.has_root_name() || p.has_root_directory();
  for (const fs::path& part : p) {
    if (part == "..") {
      bad = true;
    }
  }
  if (bad) {
    f.fail(field, "\"" + name + "\" is not a file name inside the engine folder");
  }
}

std::string read_text(const fs::path& file) {
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) {
    throw Error(file.string() + ": not found (an engine folder holds manifest.json; see "
                                "docs/engine_format.md)");
  }
  std::ifstream in(file, std::ios::binary);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (!in && !in.eof()) {
    throw Error(file.string() + ": could not be read");
  }
  return buffer.str();
}

}  // namespace

const TensorSpec* Manifest::input(const std::string& name) const noexcept {
  for (const TensorSpec& t : inputs) {
    if (t.name == name) {
      return &t;
    }
  }
  return nullptr;
}

const TensorSpec* Manifest::output(const std::string& name) const noexcept {
  for (const TensorSpec& t : outputs) {
    if (t.name == name) {
      return &t;
    }
  }
  return nullptr;
}

const FileEntry* Manifest::file(const std::string& name) const noexcept {
  for (const FileEntry& e : files) {
    if (e.name == name) {
      return &e;
    }
  }
  return nullptr;
}

bool Manifest::has_presence() const noexcept { return output(kPresenceOutput) != nullptr; }

std::optional<double> Manifest::presence_threshold(const std::string& target) const {
  auto it = presence_thresholds.find(target);
  return it == presence_thresholds.end() ? std::nullopt : std::optional<double>(it->second);
}

Manifest parse_manifest(const std::string& text, const fs::path& path) {
  Fields f(path);
  Manifest m;
  m.path = path;
  m.engine_dir = path.parent_path();
  try {
    m.raw = json::parse(text);
  } catch (const json::ParseError& e) {
    throw Error(path.string() + ": " + e.what());
  }
  const json::Value& root = m.raw;
  if (!root.is_object()) {
    throw Error(path.string() + ": expected a JSON object at the top level, got " +
                json::type_name(root));
  }

  m.format = f.string(f.require(root, "", "format", "\"promptseg-engine\""), "format");
  if (m.format != "promptseg-engine") {
    f.fail("format", "expected \"promptseg-engine\", got \"" + m.format + "\"");
  }
  m.version = f.integer(f.require(root, "", "version", "1"), "version");
  if (m.version != 1) {
    f.fail("version", "this host reads version 1, got " + std::to_string(m.version));
  }
  m.resolution = f.positive(f.require(root, "", "resolution", "an integer"), "resolution");
  m.film_dim = f.positive(f.require(root, "", "film_dim", "an integer"), "film_dim");
  m.embed_dim = f.positive(f.require(root, "", "embed_dim", "an integer"), "embed_dim");
  m.inputs = tensor_specs(f, f.require(root, "", "inputs", "a list"), "inputs");
  m.outputs = tensor_specs(f, f.require(root, "", "outputs", "a list"), "outputs");
  check_io(f, m);

  // film_layout must tile [0, film_dim) in order.
  const json::Value& layout = f.list(f.require(root, "", "film_layout", "a list"), "film_layout");
  std::int64_t next = 0;
  for (std::size_t i = 0; i < layout.size(); ++i) {
    std::string at = "film_layout[" + std::to_string(i) + "]";
    const json::Value& s = f.object(layout[i], at);
    FilmSegment seg;
    seg.name = f.string(f.require(s, at, "name", "a string"), at + ".name");
    seg.offset = f.integer(f.require(s, at, "offset", "an integer"), at + ".offset");
    seg.size = f.positive(f.require(s, at, "size", "an integer"), at + ".size");
    if (seg.offset != next) {
      f.fail(at + ".offset", "expected " + std::to_string(next) +
                                 " (segments are packed in order), got " +
                                 std::to_string(seg.offset));
    }
    next += seg.size;
    m.film_layout.push_back(seg);
  }
  if (next != m.film_dim) {
    f.fail("film_layout", "segments cover " + std::to_string(next) + " values, film_dim is " +
                              std::to_string(m.film_dim));
  }

  const json::Value& pre =
      f.object(f.require(root, "", "preprocessing", "an object"), "preprocessing");
  f.pair(f.require(pre, "preprocessing", "ct_window", "[low, high] HU"), "preprocessing.ct_window",
         m.preprocessing.ct_window);
  f.pair(f.require(pre, "preprocessing", "mr_percentiles", "[low, high] percentiles"),
         "preprocessing.mr_percentiles", m.preprocessing.mr_percentiles);
  m.preprocessing.resolution = m.resolution;
  if (const json::Value* r = json::find(pre, "resolution")) {
    std::int64_t res = f.positive(*r, "preprocessing.resolution");
    if (res != m.resolution) {
      f.fail("preprocessing.resolution", "expected " + std::to_string(m.resolution) +
                                             " (the top-level resolution), got " +
                                             std::to_string(res));
    }
  }
  if (const json::Value* o = json::find(pre, "orientation")) {
    m.preprocessing.orientation =
        check_axcodes(f, f.string(*o, "preprocessing.orientation"), "preprocessing.orientation");
  }
  if (const json::Value* mods = json::find(pre, "modalities")) {
    m.preprocessing.modalities = f.strings(*mods, "preprocessing.modalities");
  }

  if (const json::Value* o = json::find(root, "orientation")) {
    f.object(*o, "orientation");
    m.axcodes = check_axcodes(
        f, f.string(f.require(*o, "orientation", "axcodes", "a string such as \"LAS\""),
                    "orientation.axcodes"),
        "orientation.axcodes");
    if (!m.preprocessing.orientation.empty() && m.preprocessing.orientation != m.axcodes) {
      f.fail("orientation.axcodes", "\"" + m.axcodes +
                                        "\" disagrees with preprocessing.orientation \"" +
                                        m.preprocessing.orientation + "\"");
    }
  } else if (!m.preprocessing.orientation.empty()) {
    m.axcodes = m.preprocessing.orientation;
  } else {
    f.fail("orientation", "missing (expected {\"axcodes\": \"LAS\", ...})");
  }
  if (m.preprocessing.orientation.empty()) {
    m.preprocessing.orientation = m.axcodes;
  }

  m.targets = f.strings(f.require(root, "", "targets", "a list of strings"), "targets");
  if (m.targets.empty()) {
    f.fail("targets", "expected at least one target, got an empty list");
  }

  if (const json::Value* taus = optional_member(root, "presence_thresholds")) {
    f.object(*taus, "presence_thresholds");
    for (const auto& item : taus->items()) {
      const std::string at = "presence_thresholds." + item.key();
      const double tau = f.number(item.value(), at);
      if (!(tau >= 0.0 && tau <= 1.0)) {
        f.fail(at, "expected a probability in [0, 1], got " + json::dump(item.value()));
      }
      m.presence_thresholds[item.key()] = tau;
    }
  }

  const json::Value& graphs = f.object(f.require(root, "", "graphs", "an object"), "graphs");
  for (const auto& item : graphs.items()) {
    const std::string& key = item.key();
    const json::Value& v = item.value();
    if (v.is_null()) {
      continue;  // a precision that was not exported
    }
    std::string name = f.string(v, "graphs." + key);
    check_relative(f, name, "graphs." + key);
    m.graphs[key] = name;
  }

  if (const json::Value* trt = optional_member(root, "tensorrt")) {
    f.object(*trt, "tensorrt");
    TensorRTInfo info;
    info.plan = f.string(f.require(*trt, "tensorrt", "plan", "a file name"), "tensorrt.plan");
    check_relative(f, info.plan, "tensorrt.plan");
    if (const json::Value* v = optional_member(*trt, "version")) {
      info.version = f.string(*v, "tensorrt.version");
    }
    if (const json::Value* v = optional_member(*trt, "gpu")) {
      info.gpu = f.string(*v, "tensorrt.gpu");
    }
    if (const json::Value* v = optional_member(*trt, "max_batch")) {
      info.max_batch = f.positive(*v, "tensorrt.max_batch");
    }
    m.tensorrt = info;
  }

  const json::Value& files = f.object(f.require(root, "", "files", "an object"), "files");
  for (const auto& item : files.items()) {
    FileEntry e;
    e.name = item.key();
    std::string at = "files." + e.name;
    check_relative(f, e.name, at);
    const json::Value& entry = f.object(item.value(), at);
    e.sha256 = f.string(f.require(entry, at, "sha256", "64 hex digits"), at + ".sha256");
    if (!is_hex64(e.sha256)) {
      f.fail(at + ".sha256", "expected 64 hex digits, got \"" + e.sha256 + "\"");
    }
    if (const json::Value* b = optional_member(entry, "bytes")) {
      e.bytes = f.integer(*b, at + ".bytes");
      if (e.bytes < 0) {
        f.fail(at + ".bytes", "expected a size >= 0, got " + std::to_string(e.bytes));
      }
    }
    m.files.push_back(std::move(e));
  }
  if (m.file(kPromptCacheName) == nullptr) {
    f.fail("files", std::string("does not list ") + kPromptCacheName +
                        " (every engine folder has a prompt cache)");
  }
  return m;
}

Manifest read_manifest(const fs::path& engine_dir) {
  std::error_code ec;
  if (!fs::is_directory(engine_dir, ec)) {
    throw Error(engine_dir.string() + ": not a directory (expected an engine folder written by "
                                      "promptseg-export)");
  }
  fs::path path = engine_dir / kManifestName;
  return parse_manifest(read_text(path), path);
}

void check_files_present(const Manifest& manifest) {
  for (const FileEntry& e : manifest.files) {
    fs::path p = manifest.engine_dir / e.name;
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) {
      throw Error(p.string() + ": missing (listed in " + manifest.path.string() + ")");
    }
    if (e.bytes >= 0) {
      auto size = fs::file_size(p, ec);
      if (ec) {
        throw Error(p.string() + ": could not read its size (" + ec.message() + ")");
      }
      if (static_cast<std::int64_t>(size) != e.bytes) {
        throw Error(p.string() + ": " + std::to_string(size) + " bytes, " +
                    manifest.path.string() + " lists " + std::to_string(e.bytes));
      }
    }
  }
}

}  // namespace promptseg
