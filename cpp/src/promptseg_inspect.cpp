// promptseg_inspect ENGINE_DIR [--prompt TEXT]... [--verify] [--values N|all]
//
// Reads an engine folder (docs/engine_format.md) and prints, as one JSON object on stdout:
// the manifest summary (with the presence output and thresholds of newer engines), the listed
// files, the prompt cache size and, per --prompt, the cached FiLM vector's length, leading
// values, L2 norm and sum, and the presence threshold of its target. Exit status 2 with one
// line on stderr for bad input: a missing or wrongly sized file, a sha256 mismatch (--verify),
// a corrupted cache, an unknown prompt.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "cli.hpp"
#include "promptseg/json.hpp"
#include "promptseg/manifest.hpp"
#include "promptseg/safetensors.hpp"
#include "promptseg/sha256.hpp"

namespace {

constexpr const char* kProgram = "promptseg_inspect";
constexpr const char* kUsage =
    "usage: promptseg_inspect ENGINE_DIR [--prompt TEXT]... [--verify] [--values N|all]";

struct Args {
  std::string engine_dir;
  std::vector<std::string> prompts;
  bool verify = false;
  long values = 8;  // -1: all
  bool help = false;
};

Args parse_args(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&](const char* what) -> std::string {
      if (i + 1 >= argc) {
        throw promptseg::Error(a + " needs " + what + " (" + kUsage + ")");
      }
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      args.help = true;
    } else if (a == "--prompt") {
      args.prompts.push_back(next("a prompt text"));
    } else if (a == "--verify") {
      args.verify = true;
    } else if (a == "--values") {
      std::string v = next("a count or 'all'");
      if (v == "all") {
        args.values = -1;
      } else {
        char* end = nullptr;
        long n = std::strtol(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || n < 0) {
          throw promptseg::Error("--values expects a count >= 0 or 'all', got '" + v + "'");
        }
        args.values = n;
      }
    } else if (a.size() > 1 && a[0] == '-') {
      throw promptseg::Error("unknown option '" + a + "' (" + kUsage + ")");
    } else if (args.engine_dir.empty()) {
      args.engine_dir = a;
    } else {
      throw promptseg::Error("unexpected argument '" + a + "' (" + kUsage + ")");
    }
  }
  if (!args.help && args.engine_dir.empty()) {
    throw promptseg::Error(std::string("missing ENGINE_DIR (") + kUsage + ")");
  }
  return args;
}

promptseg::json::Value strings(const std::vector<std::string>& items) {
  promptseg::json::Value out = promptseg::json::Value::array();
  for (const std::string& s : items) {
    out.push_back(s);
  }
  return out;
}

promptseg::json::Value tensor_specs(const std::vector<promptseg::TensorSpec>& specs) {
  using promptseg::json::Value;
  Value out = Value::array();
  for (const promptseg::TensorSpec& t : specs) {
    Value shape = Value::array();
    for (const promptseg::Dim& d : t.shape) {
      shape.push_back(d.is_dynamic() ? Value(d.symbol) : Value(d.value));
    }
    Value spec = Value::object();
    spec["name"] = t.name;
    spec["shape"] = shape;
    spec["dtype"] = t.dtype;
    out.push_back(spec);
  }
  return out;
}

promptseg::json::Value lookup(const promptseg::Manifest& m, const promptseg::PromptCache& cache,
                              const std::string& prompt, long values) {
  using promptseg::json::Value;
  std::vector<float> film = cache.film_for(prompt);  // throws for an unknown prompt
  promptseg::PromptMatch match = *cache.find(prompt);
  double sum = 0.0;
  double squares = 0.0;
  for (float v : film) {
    sum += static_cast<double>(v);
    squares += static_cast<double>(v) * static_cast<double>(v);
  }
  Value head = Value::array();
  std::size_t count = values < 0 ? film.size()
                                 : std::min(film.size(), static_cast<std::size_t>(values));
  for (std::size_t i = 0; i < count; ++i) {
    head.push_back(static_cast<double>(film[i]));
  }
  Value out = Value::object();
  out["prompt"] = prompt;
  out["matched"] = cache.prompts()[match.index];
  out["match"] = match.exact ? "exact" : "normalized";
  out["index"] = match.index;
  out["target"] = cache.targets()[match.index];
  const std::optional<double> tau = m.presence_threshold(cache.targets()[match.index]);
  out["presence_threshold"] = tau ? Value(*tau) : Value();
  out["length"] = film.size();
  out["values"] = head;
  out["l2_norm"] = std::sqrt(squares);
  out["sum"] = sum;
  return out;
}

int run(int argc, char** argv) {
  using promptseg::json::Value;
  Args args = parse_args(argc, argv);
  if (args.help) {
    std::printf("%s\n", kUsage);
    return 0;
  }
  promptseg::Manifest m = promptseg::read_manifest(args.engine_dir);
  if (args.verify) {
    promptseg::verify_files(m);
  } else {
    promptseg::check_files_present(m);
  }
  promptseg::PromptCache cache = promptseg::PromptCache::open(m);

  Value out = Value::object();
  out["engine_dir"] = args.engine_dir;
  out["format"] = m.format;
  out["version"] = m.version;
  out["resolution"] = m.resolution;
  out["inputs"] = tensor_specs(m.inputs);
  out["outputs"] = tensor_specs(m.outputs);
  out["film_dim"] = m.film_dim;
  out["embed_dim"] = m.embed_dim;
  Value layout = Value::array();
  for (const promptseg::FilmSegment& s : m.film_layout) {
    Value seg = Value::object();
    seg["name"] = s.name;
    seg["offset"] = s.offset;
    seg["size"] = s.size;
    layout.push_back(seg);
  }
  out["film_layout"] = layout;
  Value pre = Value::object();
  pre["resolution"] = m.preprocessing.resolution;
  Value ct = Value::array();
  ct.push_back(m.preprocessing.ct_window[0]);
  ct.push_back(m.preprocessing.ct_window[1]);
  pre["ct_window"] = ct;
  Value mr = Value::array();
  mr.push_back(m.preprocessing.mr_percentiles[0]);
  mr.push_back(m.preprocessing.mr_percentiles[1]);
  pre["mr_percentiles"] = mr;
  pre["modalities"] = strings(m.preprocessing.modalities);
  out["preprocessing"] = pre;
  out["orientation"] = m.axcodes;
  out["targets"] = strings(m.targets);
  out["presence_output"] = m.has_presence();
  Value taus = Value::object();
  for (const auto& [target, tau] : m.presence_thresholds) {
    taus[target] = tau;
  }
  out["presence_thresholds"] = taus;
  Value graphs = Value::object();
  for (const auto& [precision, file] : m.graphs) {
    graphs[precision] = file;
  }
  out["graphs"] = graphs;
  if (m.tensorrt) {
    Value trt = Value::object();
    trt["plan"] = m.tensorrt->plan;
    trt["version"] = m.tensorrt->version;
    trt["gpu"] = m.tensorrt->gpu;
    trt["max_batch"] = m.tensorrt->max_batch;
    out["tensorrt"] = trt;
  } else {
    out["tensorrt"] = nullptr;
  }
  Value files = Value::array();
  for (const promptseg::FileEntry& e : m.files) {
    Value f = Value::object();
    f["name"] = e.name;
    f["bytes"] = e.bytes;
    f["sha256"] = e.sha256;
    files.push_back(f);
  }
  out["files"] = files;
  out["verified"] = args.verify;

  Value c = Value::object();
  c["file"] = promptseg::kPromptCacheName;
  c["prompts"] = cache.size();
  c["film_dim"] = cache.film_dim();
  c["embed_dim"] = cache.embed_dim();
  c["targets"] = strings(cache.unique_targets());
  out["cache"] = c;

  Value lookups = Value::array();
  for (const std::string& p : args.prompts) {
    lookups.push_back(lookup(m, cache, p, args.values));
  }
  out["lookups"] = lookups;

  std::printf("%s\n", promptseg::json::dump(out, 2).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return promptseg::cli::guarded(kProgram, [&] { return run(argc, argv); });
}
