// promptseg_trt ENGINE_DIR --prompt TEXT --input SLICES.f32 --output PREFIX
//                [--threshold P] [--presence-threshold TAU] [--no-presence-gate]
//                [--logits PATH] [--verify] [--verbose]
//
// Segments preprocessed slices with the engine folder's TensorRT plan (TensorRT 10 / 11 API:
// name-based I/O, setInputShape, setTensorAddress, enqueueV3).
//
// Plans of newer exports have a second output "presence" [N, 1] (one presence logit per
// slice): a slice whose sigmoid(presence) < tau gets an empty mask, tau being the manifest's
// presence_thresholds entry for the prompt's target (--presence-threshold overrides it for
// every target, --no-presence-gate turns the gate off), as promptseg-run does.
//
// Input: raw little-endian float32, N slices of R x R (R = manifest "resolution"), row-major,
// slice after slice, already oriented, normalised to [0, 1] and resized (cpp/README.md).
// Output: PREFIX.raw (N*R*R uint8, 1 = target, 0 = background; logits > logit(P), i.e.
// probability > P, default 0.5 -> logits > 0) and PREFIX.pgm (the same mask, 0/255, slices
// stacked vertically: width R, height N*R). Prints a JSON summary on stdout; bad input exits 2
// with one line on stderr.
#include <NvInferRuntime.h>
#include <NvInferVersion.h>
#include <cuda_runtime_api.h>

#if !defined(NV_TENSORRT_MAJOR) || NV_TENSORRT_MAJOR < 10
#error "promptseg_trt needs TensorRT 10 or 11 (enqueueV3 and the name-based tensor API)"
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cli.hpp"
#include "promptseg/json.hpp"
#include "promptseg/manifest.hpp"
#include "promptseg/presence.hpp"
#include "promptseg/safetensors.hpp"
#include "promptseg/sha256.hpp"

namespace fs = std::filesystem;
using promptseg::Error;
using promptseg::json::Value;

namespace {

constexpr const char* kProgram = "promptseg_trt";
constexpr const char* kUsage =
    "usage: promptseg_trt ENGINE_DIR --prompt TEXT --input SLICES.f32 --output PREFIX "
    "[--threshold P] [--presence-threshold TAU] [--no-presence-gate] [--logits PATH] "
    "[--verify] [--verbose]";

struct Args {
  std::string engine_dir;
  std::string prompt;
  std::string input;
  std::string output;
  std::string logits;
  double threshold = 0.5;
  promptseg::PresenceOptions presence;  // --presence-threshold, --no-presence-gate
  bool verify = false;
  bool verbose = false;
  bool help = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  bool have_prompt = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        throw Error(arg + " needs a value (" + kUsage + ")");
      }
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      a.help = true;
    } else if (arg == "--prompt") {
      a.prompt = next();
      have_prompt = true;
    } else if (arg == "--input") {
      a.input = next();
    } else if (arg == "--output") {
      a.output = next();
    } else if (arg == "--logits") {
      a.logits = next();
    } else if (arg == "--threshold") {
      std::string v = next();
      char* end = nullptr;
      a.threshold = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(a.threshold > 0.0 && a.threshold < 1.0)) {
        throw Error("--threshold expects a probability in (0, 1), got '" + v + "'");
      }
    } else if (arg == "--presence-threshold") {
      std::string v = next();
      char* end = nullptr;
      const double tau = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(tau >= 0.0 && tau <= 1.0)) {
        throw Error("--presence-threshold expects a probability in [0, 1], got '" + v + "'");
      }
      a.presence.threshold = tau;
    } else if (arg == "--no-presence-gate") {
      a.presence.gate = false;
    } else if (arg == "--verify") {
      a.verify = true;
    } else if (arg == "--verbose") {
      a.verbose = true;
    } else if (arg.size() > 1 && arg[0] == '-') {
      throw Error("unknown option '" + arg + "' (" + kUsage + ")");
    } else if (a.engine_dir.empty()) {
      a.engine_dir = arg;
    } else {
      throw Error("unexpected argument '" + arg + "' (" + kUsage + ")");
    }
  }
  if (a.help) {
    return a;
  }
  if (a.engine_dir.empty() || !have_prompt || a.input.empty() || a.output.empty()) {
    throw Error(std::string("ENGINE_DIR, --prompt, --input and --output are required (") +
                kUsage + ")");
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// TensorRT and CUDA plumbing

/// Keeps the last error TensorRT reported (for the exception message); prints the rest only
/// with --verbose so that failures stay one line on stderr.
class Logger final : public nvinfer1::ILogger {
 public:
  explicit Logger(bool verbose) : verbose_(verbose) {}

  void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override {
    const char* text = msg != nullptr ? msg : "";
    if (severity <= Severity::kERROR) {
      last_error_ = text;
    }
    if (verbose_ && severity <= Severity::kINFO) {
      std::fprintf(stderr, "[TensorRT] %s\n", text);
    }
  }

  std::string last_error() const {
    return last_error_.empty() ? std::string() : " (TensorRT: " + last_error_ + ")";
  }

 private:
  bool verbose_;
  std::string last_error_;
};

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Error(std::string("CUDA ") + what + " failed: " + cudaGetErrorName(status) + ": " +
                cudaGetErrorString(status));
  }
}

class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) {
    cuda_check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) {
      cudaFree(ptr_);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const noexcept { return ptr_; }

 private:
  void* ptr_ = nullptr;
};

class Stream {
 public:
  Stream() { cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate"); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_{};
};

nvinfer1::Dims make_dims(std::initializer_list<std::int64_t> values) {
  nvinfer1::Dims d{};
  d.nbDims = static_cast<std::int32_t>(values.size());
  std::int32_t i = 0;
  for (std::int64_t v : values) {
    d.d[i++] = v;
  }
  return d;
}

std::string dims_text(const nvinfer1::Dims& d) {
  std::string out = "[";
  for (std::int32_t i = 0; i < d.nbDims; ++i) {
    out += (i ? ", " : "") + std::to_string(static_cast<long long>(d.d[i]));
  }
  return out + "]";
}

// ---------------------------------------------------------------------------------------------
// Files

std::string read_binary(const fs::path& file, const char* what) {
  std::error_code ec;
  if (!fs::is_regular_file(file, ec)) {
    throw Error(file.string() + ": " + what + " not found");
  }
  std::ifstream in(file, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  if (!in && !in.eof()) {
    throw Error(file.string() + ": could not be read");
  }
  return s.str();
}

/// N slices of R x R float32 (little-endian), checked to be finite and within [0, 1].
std::vector<float> read_slices(const fs::path& file, std::int64_t resolution) {
  const std::string bytes = read_binary(file, "slice file");
  const std::size_t slice_bytes = static_cast<std::size_t>(resolution * resolution) * 4;
  if (bytes.empty() || bytes.size() % slice_bytes != 0) {
    throw Error(file.string() + ": " + std::to_string(bytes.size()) +
                " bytes is not a whole number of " + std::to_string(resolution) + "x" +
                std::to_string(resolution) + " float32 slices (" + std::to_string(slice_bytes) +
                " bytes each; see cpp/README.md)");
  }
  std::vector<float> values(bytes.size() / 4);
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint32_t bits = 0;
    for (int k = 3; k >= 0; --k) {
      bits = (bits << 8) | static_cast<unsigned char>(bytes[4 * i + static_cast<std::size_t>(k)]);
    }
    std::memcpy(&values[i], &bits, 4);
    // Preprocessing clips to [0, 1]; allow rounding from the resize.
    if (!std::isfinite(values[i]) || values[i] < -1e-3f || values[i] > 1.001f) {
      throw Error(file.string() + ": value " + std::to_string(values[i]) + " at index " +
                  std::to_string(i) +
                  " is outside [0, 1]; the slice file must hold preprocessed intensities "
                  "(cpp/README.md)");
    }
  }
  return values;
}

/// Write through a temporary file in the same folder, then rename.
void write_atomic(const fs::path& file, const void* data, std::size_t size) {
  fs::path tmp = file;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
    if (!out) {
      throw Error(tmp.string() + ": could not be written");
    }
  }
  std::error_code ec;
  fs::rename(tmp, file, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error(file.string() + ": could not be written (" + ec.message() + ")");
  }
}

// ---------------------------------------------------------------------------------------------

void check_tensor(const nvinfer1::ICudaEngine& engine, const char* name,
                  nvinfer1::TensorIOMode mode, const fs::path& plan) {
  nvinfer1::TensorIOMode actual = engine.getTensorIOMode(name);
  if (actual == nvinfer1::TensorIOMode::kNONE) {
    std::string names;
    for (std::int32_t i = 0; i < engine.getNbIOTensors(); ++i) {
      names += (i ? ", " : "") + std::string(engine.getIOTensorName(i));
    }
    throw Error(plan.string() + ": the engine has no tensor '" + name + "' (its I/O: " + names +
                "; expected image, film -> logits[, presence])");
  }
  if (actual != mode) {
    throw Error(plan.string() + ": tensor '" + name + "' should be an " +
                (mode == nvinfer1::TensorIOMode::kINPUT ? "input" : "output"));
  }
  if (engine.getTensorDataType(name) != nvinfer1::DataType::kFLOAT) {
    throw Error(plan.string() + ": tensor '" + name +
                "' is not float32 (the contract keeps float32 at the boundary)");
  }
}

/// The optimisation batch range of a plan: fixed in the plan, or the first profile's
/// [min, max] common to image and film.
std::pair<std::int64_t, std::int64_t> batch_range(const nvinfer1::ICudaEngine& engine,
                                                  const fs::path& plan_path) {
  const nvinfer1::Dims image_dims = engine.getTensorShape("image");
  if (image_dims.d[0] > 0) {
    return {image_dims.d[0], image_dims.d[0]};
  }
  std::int64_t min_batch = 1;
  std::int64_t max_batch = 1;
  for (const char* name : {"image", "film"}) {
    nvinfer1::Dims lo = engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMIN);
    nvinfer1::Dims hi = engine.getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMAX);
    if (lo.nbDims < 1 || hi.nbDims < 1 || hi.d[0] < 1) {
      throw Error(plan_path.string() + ": no optimisation profile for '" + name +
                  "' (a dynamic batch needs one)");
    }
    min_batch = std::max<std::int64_t>(min_batch, lo.d[0]);
    max_batch = name == std::string("image") ? hi.d[0] : std::min(max_batch, hi.d[0]);
  }
  if (min_batch > max_batch) {
    throw Error(plan_path.string() + ": optimisation profiles allow no common batch size");
  }
  return {min_batch, max_batch};
}

/// Check the plan's I/O against the manifest and the prompt cache; returns whether the plan
/// has the optional ``presence`` output (which must then be bound too).
bool check_engine_io(const nvinfer1::ICudaEngine& engine, const promptseg::Manifest& m,
                     std::int64_t P, const fs::path& plan_path) {
  const std::int64_t R = m.resolution;
  check_tensor(engine, "image", nvinfer1::TensorIOMode::kINPUT, plan_path);
  check_tensor(engine, "film", nvinfer1::TensorIOMode::kINPUT, plan_path);
  check_tensor(engine, promptseg::kLogitsOutput, nvinfer1::TensorIOMode::kOUTPUT, plan_path);
  const nvinfer1::Dims image_dims = engine.getTensorShape("image");
  const nvinfer1::Dims film_dims = engine.getTensorShape("film");
  if (image_dims.nbDims != 4 || (image_dims.d[2] >= 0 && image_dims.d[2] != R) ||
      (image_dims.d[3] >= 0 && image_dims.d[3] != R)) {
    throw Error(plan_path.string() + ": image is " + dims_text(image_dims) + ", the manifest " +
                "says [N, 1, " + std::to_string(R) + ", " + std::to_string(R) + "]");
  }
  if (film_dims.nbDims != 2 || (film_dims.d[1] >= 0 && film_dims.d[1] != P)) {
    throw Error(plan_path.string() + ": film is " + dims_text(film_dims) + ", the prompt cache " +
                "has " + std::to_string(P) + " values per prompt");
  }
  const bool presence =
      engine.getTensorIOMode(promptseg::kPresenceOutput) != nvinfer1::TensorIOMode::kNONE;
  if (!presence) {
    if (m.has_presence()) {
      throw Error(plan_path.string() + ": the plan has no 'presence' output but " +
                  m.path.string() + " lists one (rebuild the plan with promptseg-export)");
    }
    return false;
  }
  check_tensor(engine, promptseg::kPresenceOutput, nvinfer1::TensorIOMode::kOUTPUT, plan_path);
  const nvinfer1::Dims dims = engine.getTensorShape(promptseg::kPresenceOutput);
  if (dims.nbDims != 2 || (dims.d[1] >= 0 && dims.d[1] != 1)) {
    throw Error(plan_path.string() + ": presence is " + dims_text(dims) +
                ", expected [N, 1] (one presence logit per slice)");
  }
  return true;
}

/// Raw outputs of the plan over all slices.
struct Inference {
  std::vector<float> logits;    ///< N x R x R
  std::vector<float> presence;  ///< N presence logits; empty when the plan has no such output
  std::int64_t min_batch = 1;
  std::int64_t max_batch = 1;
  double milliseconds = 0.0;
};

/// Run the slices (N x R x R) through the plan in batches, ``film`` repeated per slice.
Inference infer(nvinfer1::ICudaEngine& engine, const Logger& logger, const fs::path& plan_path,
                const std::vector<float>& slices, const std::vector<float>& film,
                std::int64_t R, bool with_presence) {
  const auto P = static_cast<std::int64_t>(film.size());
  const auto plane = static_cast<std::size_t>(R * R);
  const auto n = static_cast<std::int64_t>(slices.size() / plane);
  Inference out;
  std::tie(out.min_batch, out.max_batch) = batch_range(engine, plan_path);
  const std::int64_t max_batch = out.max_batch;

  std::unique_ptr<nvinfer1::IExecutionContext> context(engine.createExecutionContext());
  if (!context) {
    throw Error(plan_path.string() + ": createExecutionContext failed" + logger.last_error());
  }
  Stream stream;
  const auto cap = static_cast<std::size_t>(max_batch);
  DeviceBuffer d_image(cap * plane * sizeof(float));
  DeviceBuffer d_film(cap * static_cast<std::size_t>(P) * sizeof(float));
  DeviceBuffer d_logits(cap * plane * sizeof(float));
  std::optional<DeviceBuffer> d_presence;  // every output of the plan must have an address
  if (with_presence) {
    d_presence.emplace(cap * sizeof(float));
  }
  std::vector<float> h_image(cap * plane);
  std::vector<float> h_film(cap * static_cast<std::size_t>(P));
  for (std::size_t b = 0; b < cap; ++b) {
    std::copy(film.begin(), film.end(), h_film.begin() + static_cast<std::ptrdiff_t>(b * P));
  }
  std::vector<float> h_logits(cap * plane);
  std::vector<float> h_presence(with_presence ? cap : 0);
  out.logits.resize(static_cast<std::size_t>(n) * plane);
  out.presence.resize(with_presence ? static_cast<std::size_t>(n) : 0);

  if (!context->setTensorAddress("image", d_image.get()) ||
      !context->setTensorAddress("film", d_film.get()) ||
      !context->setTensorAddress(promptseg::kLogitsOutput, d_logits.get()) ||
      (with_presence &&
       !context->setTensorAddress(promptseg::kPresenceOutput, d_presence->get()))) {
    throw Error("setTensorAddress failed" + logger.last_error());
  }
  const auto started = std::chrono::steady_clock::now();
  for (std::int64_t start = 0; start < n; start += max_batch) {
    const std::int64_t count = std::min(max_batch, n - start);
    const std::int64_t batch = std::max(count, out.min_batch);  // pad up to the profile minimum
    std::fill(h_image.begin(), h_image.end(), 0.0f);
    std::copy(slices.begin() + static_cast<std::ptrdiff_t>(start * plane),
              slices.begin() + static_cast<std::ptrdiff_t>((start + count) * plane),
              h_image.begin());
    if (!context->setInputShape("image", make_dims({batch, 1, R, R})) ||
        !context->setInputShape("film", make_dims({batch, P}))) {
      throw Error("setInputShape failed for batch " + std::to_string(batch) + logger.last_error());
    }
    cuda_check(cudaMemcpyAsync(d_image.get(), h_image.data(),
                               static_cast<std::size_t>(batch) * plane * sizeof(float),
                               cudaMemcpyHostToDevice, stream.get()),
               "cudaMemcpyAsync (image)");
    cuda_check(cudaMemcpyAsync(d_film.get(), h_film.data(),
                               static_cast<std::size_t>(batch * P) * sizeof(float),
                               cudaMemcpyHostToDevice, stream.get()),
               "cudaMemcpyAsync (film)");
    if (!context->enqueueV3(stream.get())) {
      throw Error("enqueueV3 failed" + logger.last_error());
    }
    cuda_check(cudaMemcpyAsync(h_logits.data(), d_logits.get(),
                               static_cast<std::size_t>(batch) * plane * sizeof(float),
                               cudaMemcpyDeviceToHost, stream.get()),
               "cudaMemcpyAsync (logits)");
    if (with_presence) {
      cuda_check(cudaMemcpyAsync(h_presence.data(), d_presence->get(),
                                 static_cast<std::size_t>(batch) * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream.get()),
                 "cudaMemcpyAsync (presence)");
    }
    cuda_check(cudaStreamSynchronize(stream.get()), "cudaStreamSynchronize");
    const nvinfer1::Dims shape = context->getTensorShape(promptseg::kLogitsOutput);
    if (shape.nbDims != 4 || shape.d[0] != batch || shape.d[1] != 1 || shape.d[2] != R ||
        shape.d[3] != R) {
      throw Error(plan_path.string() + ": logits came back as " + dims_text(shape) +
                  ", expected [" + std::to_string(batch) + ", 1, " + std::to_string(R) + ", " +
                  std::to_string(R) + "]");
    }
    std::copy(h_logits.begin(), h_logits.begin() + static_cast<std::ptrdiff_t>(count * plane),
              out.logits.begin() + static_cast<std::ptrdiff_t>(start * plane));
    if (with_presence) {
      const nvinfer1::Dims p = context->getTensorShape(promptseg::kPresenceOutput);
      if (p.nbDims != 2 || p.d[0] != batch || p.d[1] != 1) {
        throw Error(plan_path.string() + ": presence came back as " + dims_text(p) +
                    ", expected [" + std::to_string(batch) + ", 1]");
      }
      std::copy(h_presence.begin(), h_presence.begin() + static_cast<std::ptrdiff_t>(count),
                out.presence.begin() + static_cast<std::ptrdiff_t>(start));
    }
  }
  out.milliseconds =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - started)
          .count();
  return out;
}

/// PREFIX.raw, PREFIX.pgm and, when asked, the raw logits (little-endian float32).
void write_outputs(const Args& args, const std::vector<std::uint8_t>& mask,
                   const std::vector<float>& logits, std::int64_t R, std::int64_t n) {
  write_atomic(args.output + ".raw", mask.data(), mask.size());
  std::string pgm = "P5\n" + std::to_string(R) + " " + std::to_string(R * n) + "\n255\n";
  pgm.reserve(pgm.size() + mask.size());
  for (std::uint8_t v : mask) {
    pgm += static_cast<char>(v ? 255 : 0);
  }
  write_atomic(args.output + ".pgm", pgm.data(), pgm.size());
  if (!args.logits.empty()) {
    std::string le(logits.size() * 4, '\0');
    for (std::size_t i = 0; i < logits.size(); ++i) {
      std::uint32_t bits = 0;
      std::memcpy(&bits, &logits[i], 4);
      for (int k = 0; k < 4; ++k) {
        le[4 * i + static_cast<std::size_t>(k)] = static_cast<char>((bits >> (8 * k)) & 0xFF);
      }
    }
    write_atomic(args.logits, le.data(), le.size());
  }
}

/// A JSON number, or null.
template <typename T>
Value or_null(const std::optional<T>& value) {
  return value ? Value(*value) : Value();
}

int run(int argc, char** argv) {
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
  if (!m.tensorrt) {
    throw Error(m.path.string() + ": no \"tensorrt\" entry (no plan was built; export on a "
                                  "machine where tensorrt imports)");
  }
  const fs::path plan_path = m.engine_dir / m.tensorrt->plan;
  promptseg::PromptCache cache = promptseg::PromptCache::open(m);
  const std::vector<float> film = cache.film_for(args.prompt);
  const promptseg::PromptMatch match = *cache.find(args.prompt);
  const std::string& target = cache.targets()[match.index];
  const std::optional<double> tau = promptseg::presence_tau(m, target, args.presence);

  const std::int64_t R = m.resolution;
  const std::vector<float> slices = read_slices(args.input, R);
  const auto plane = static_cast<std::size_t>(R * R);
  const auto n = static_cast<std::int64_t>(slices.size() / plane);

  const std::string plan = read_binary(plan_path, "TensorRT plan");
  Logger logger(args.verbose);
  // Destruction runs in reverse: engine, runtime (the context lives inside infer()).
  std::unique_ptr<nvinfer1::IRuntime> runtime(nvinfer1::createInferRuntime(logger));
  if (!runtime) {
    throw Error("createInferRuntime failed" + logger.last_error());
  }
  std::unique_ptr<nvinfer1::ICudaEngine> engine(
      runtime->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine) {
    throw Error(plan_path.string() + ": deserializeCudaEngine failed (built by another TensorRT " +
                "version or for another GPU?)" + logger.last_error());
  }
  const bool with_presence =
      check_engine_io(*engine, m, static_cast<std::int64_t>(film.size()), plan_path);
  const Inference result = infer(*engine, logger, plan_path, slices, film, R, with_presence);

  // logit(p): probability > p <=> logit > log(p / (1 - p)); 0.5 -> 0.
  const auto cut = static_cast<float>(std::log(args.threshold / (1.0 - args.threshold)));
  std::vector<std::uint8_t> mask(result.logits.size());
  for (std::size_t i = 0; i < mask.size(); ++i) {
    mask[i] = result.logits[i] > cut ? 1 : 0;
  }
  // Slices whose sigmoid(presence) < tau go empty (nothing happens without the output).
  const promptseg::PresenceGate gate =
      promptseg::apply_presence_gate(result.presence, tau, mask, plane);
  Value foreground = Value::array();
  for (std::size_t s = 0; s < static_cast<std::size_t>(n); ++s) {
    const auto first = mask.begin() + static_cast<std::ptrdiff_t>(s * plane);
    const auto on = std::count(first, first + static_cast<std::ptrdiff_t>(plane), 1);
    foreground.push_back(static_cast<double>(on) / static_cast<double>(plane));
  }
  write_outputs(args, mask, result.logits, R, n);

  Value warnings = Value::array();
  if (gate.slices_gated > 0 && !gate.present) {
    char line[200];
    std::snprintf(line, sizeof line,
                  "the presence gate emptied %zu of %lld slices (highest presence probability "
                  "%.3f, threshold %g); its mask is empty",
                  gate.slices_gated, static_cast<long long>(n),
                  static_cast<double>(gate.max_probability().value_or(0.0f)), *gate.threshold);
    warnings.push_back("'" + target + "' is absent: " + line);
  }
  if (!with_presence && args.presence.threshold && args.presence.gate) {
    warnings.push_back("--presence-threshold has no effect: the plan has no presence output");
  }
  for (const Value& w : warnings) {
    std::fprintf(stderr, "%s: warning: %s\n", kProgram,
                 promptseg::cli::one_line(w.get<std::string>()).c_str());
  }

  Value out = Value::object();
  out["engine_dir"] = args.engine_dir;
  out["plan"] = m.tensorrt->plan;
  out["tensorrt_headers"] = std::to_string(NV_TENSORRT_MAJOR) + "." +
                            std::to_string(NV_TENSORRT_MINOR) + "." +
                            std::to_string(NV_TENSORRT_PATCH);
  out["prompt"] = args.prompt;
  out["matched"] = cache.prompts()[match.index];
  out["target"] = target;
  out["slices"] = n;
  out["resolution"] = R;
  out["batch"] = Value::array({result.min_batch, result.max_batch});
  out["threshold"] = args.threshold;
  out["foreground"] = foreground;
  // The presence gate, with promptseg-run's field names (null: no presence output / no tau).
  out["present"] = gate.present;
  out["presence_max_probability"] = or_null(gate.max_probability());
  out["presence_threshold"] = or_null(gate.threshold);
  out["slices_gated"] = gate.slices_gated;
  out["presence_probability"] =
      with_presence ? Value(gate.probabilities) : Value();  // per slice
  out["milliseconds"] = result.milliseconds;
  out["mask"] = args.output + ".raw";
  out["pgm"] = args.output + ".pgm";
  out["logits"] = args.logits.empty() ? Value() : Value(args.logits);
  out["warnings"] = warnings;
  std::printf("%s\n", promptseg::json::dump(out, 2).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return promptseg::cli::guarded(kProgram, [&] { return run(argc, argv); });
}
