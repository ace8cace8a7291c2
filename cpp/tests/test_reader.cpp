// ctest: the readers on files they write themselves: a safetensors prompt cache and manifest
// (good, corrupted, malformed JSON), SHA-256 test vectors and the presence gate.
//
// usage: test_reader WORK_DIR   (files are written there; no external data needed)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "promptseg/json.hpp"
#include "promptseg/manifest.hpp"
#include "promptseg/presence.hpp"
#include "promptseg/safetensors.hpp"
#include "promptseg/sha256.hpp"

namespace fs = std::filesystem;
using promptseg::Error;
namespace json = promptseg::json;

namespace {

int g_failures = 0;
int g_checks = 0;

void report(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, what.c_str());
}

#define CHECK(cond) check_true(__FILE__, __LINE__, #cond, static_cast<bool>(cond))
#define CHECK_EQ(a, b) check_eq(__FILE__, __LINE__, #a " == " #b, (a), (b))
// ``expr`` must throw promptseg::Error whose one-line message contains every fragment.
#define CHECK_THROWS(expr, ...) \
  check_throws(__FILE__, __LINE__, #expr, [&] { (void)(expr); }, {__VA_ARGS__})

void check_true(const char* file, int line, const char* text, bool ok) {
  ++g_checks;
  if (!ok) {
    report(file, line, text);
  }
}

template <typename A, typename B>
void check_eq(const char* file, int line, const char* text, const A& a, const B& b) {
  ++g_checks;
  if (!(a == b)) {
    std::ostringstream msg;
    msg << text << " (got " << a << " vs " << b << ")";
    report(file, line, msg.str());
  }
}

void check_throws(const char* file, int line, const char* text,
                  const std::function<void()>& body, std::initializer_list<const char*> frags) {
  ++g_checks;
  try {
    body();
  } catch (const Error& e) {
    const std::string caught = e.what();
    for (const char* frag : frags) {
      if (caught.find(frag) == std::string::npos) {
        report(file, line, std::string(text) + ": message lacks '" + frag + "': " + caught);
      }
    }
    if (caught.find('\n') != std::string::npos) {
      report(file, line, std::string(text) + ": message spans lines");
    }
    return;
  }
  report(file, line, std::string(text) + " did not throw promptseg::Error");
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string le64(std::uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) {
    out[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFF);
  }
  return out;
}

std::string le_floats(const std::vector<float>& values) {
  std::string out;
  for (float f : values) {
    std::uint32_t bits = 0;
    std::memcpy(&bits, &f, 4);
    for (int i = 0; i < 4; ++i) {
      out += static_cast<char>((bits >> (8 * i)) & 0xFF);
    }
  }
  return out;
}

/// A safetensors file: header JSON padded with spaces to a multiple of 8, then data.
std::string safetensors_bytes(std::string header, const std::string& data) {
  while ((8 + header.size()) % 8 != 0) {
    header += ' ';
  }
  return le64(header.size()) + header + data;
}

// ---------------------------------------------------------------------------------------------

void test_json_helpers() {
  // What the readers rely on beyond nlohmann/json itself.
  CHECK_EQ(json::exact_integer(json::parse("7")).value_or(-1), std::int64_t{7});
  CHECK_EQ(json::exact_integer(json::parse("-9223372036854775808")).value_or(0),
           std::numeric_limits<std::int64_t>::min());
  CHECK_EQ(json::exact_integer(json::parse("2.0")).value_or(-1), std::int64_t{2});
  CHECK(!json::exact_integer(json::parse("2.5")).has_value());
  CHECK(!json::exact_integer(json::parse("9223372036854775808")).has_value());
  CHECK(!json::exact_integer(json::parse("\"7\"")).has_value());
  json::Value doc = json::parse(R"({"b": 1, "a": 2, "b": 3})");
  CHECK_EQ(doc.begin().key(), std::string("b"));  // document order kept
  CHECK_EQ(json::find(doc, "b")->get<int>(), 3);  // a repeated name keeps the last value
  CHECK(json::find(doc, "c") == nullptr);
  CHECK(json::find(json::parse("[1]"), "b") == nullptr);
  CHECK(json::parse("\xEF\xBB\xBF{\"bom\": 1}").is_object());

  // Printing: float32 values read back exactly, non-JSON numbers become null, and bytes that
  // are not UTF-8 (a prompt typed in another encoding) cannot make printing throw.
  for (float f : {1.0f / 3.0f, -7.25e-12f, 3.4028235e38f, 1.1754944e-38f, 3.0e-39f, -0.0f}) {
    const std::string text = json::dump(json::Value(static_cast<double>(f)));
    const auto back = static_cast<float>(json::parse(text).get<double>());
    CHECK_EQ(back, f);
    CHECK_EQ(std::signbit(back), std::signbit(f));
  }
  CHECK_EQ(json::dump(json::Value(1.0)), std::string("1.0"));
  CHECK_EQ(json::dump(json::Value(std::nan(""))), std::string("null"));
  CHECK_EQ(json::dump(json::Value(std::string("bad \xC3"))), std::string("\"bad \xEF\xBF\xBD\""));

  // Errors: one line, "invalid JSON", the position where one is known.
  CHECK_THROWS(json::parse("{\n  \"a\": [1,\n  ?]\n}"), "invalid JSON at line 3, column 3");
  CHECK_THROWS(json::parse(""), "invalid JSON at line 1, column 1");
  CHECK_THROWS(json::parse("[1e400]"), "invalid JSON", "1e400");
  try {
    json::parse("[1,\n 2,,]");
    report(__FILE__, __LINE__, "[1, 2,,] parsed");
  } catch (const json::ParseError& e) {
    CHECK_EQ(e.line(), std::size_t{2});
    CHECK_EQ(e.column(), std::size_t{4});
  }

  auto list = json::parse_string_list(R"(["Segment the liver", "caf\u00e9"])");
  CHECK_EQ(list.size(), std::size_t{2});
  CHECK_EQ(list[1], std::string("caf\xC3\xA9"));
  CHECK_THROWS(json::parse_string_list(R"(["a", 1])"), "element 1 is number");
  CHECK_THROWS(json::parse_string_list(R"({"a": 1})"), "expected a JSON list of strings");
}

void test_sha256(const fs::path& work) {
  CHECK_EQ(promptseg::sha256_hex(""),
           std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
  CHECK_EQ(promptseg::sha256_hex("abc"),
           std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
  CHECK_EQ(promptseg::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
           std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
  std::string million(1000000, 'a');
  CHECK_EQ(promptseg::sha256_hex(million),
           std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
  // Incremental updates at awkward sizes give the same digest.
  promptseg::Sha256 h;
  std::size_t pos = 0;
  for (std::size_t step : {1, 63, 64, 65, 127, 1000, 4096}) {
    h.update(million.data() + pos, step);
    pos += step;
  }
  h.update(million.data() + pos, million.size() - pos);
  CHECK_EQ(h.hexdigest(), promptseg::sha256_hex(million));
  write_file(work / "abc.bin", "abc");
  CHECK_EQ(promptseg::sha256_file(work / "abc.bin"), promptseg::sha256_hex("abc"));
  CHECK_THROWS(promptseg::sha256_file(work / "absent.bin"), "absent.bin");
}

// K=3 prompts, P=4, E=2.
const std::vector<float> kFilm = {1.0f,  0.5f,  -0.25f, 3.0e-8f, 0.0f, 1.0f, 2.0f, -3.0f,
                                  1e30f, -1e-30f, 0.1f,  0.2f};
const std::vector<float> kEmbedding = {0.6f, 0.8f, -1.0f, 0.0f, 0.25f, -0.75f};

// The metadata "prompts" value as it appears inside the header JSON (escaped twice).
const char* const kPromptsJson =
    R"([\"Segment the liver\", \"left kidney\", \"caf\\u00e9 \\\"q\\\"\"])";

std::string cache_header(const std::string& film_dtype = "F32",
                         const std::string& prompts = kPromptsJson) {
  return std::string(R"({"__metadata__": {"format": "promptseg-prompt-cache", "version": "1",)") +
         R"( "prompts": ")" + prompts + R"(",)" +
         R"( "targets": "[\"liver\", \"left kidney\", \"liver\"]", "film_dim": "4",)" +
         R"( "embed_dim": "2"},)" + R"( "embedding": {"dtype": "F32", "shape": [3, 2],)" +
         R"( "data_offsets": [48, 72]}, "film": {"dtype": ")" + film_dtype +
         R"(", "shape": [3, 4], "data_offsets": [0, 48]}})";
}

void test_safetensors(const fs::path& work) {
  const std::string data = le_floats(kFilm) + le_floats(kEmbedding);
  const fs::path good = work / "prompt_cache.safetensors";
  write_file(good, safetensors_bytes(cache_header(), data));

  promptseg::SafetensorsFile file = promptseg::SafetensorsFile::read(good);
  CHECK_EQ(file.tensors().size(), std::size_t{2});
  CHECK_EQ(file.tensors()[0].name, std::string("film"));  // data order
  CHECK_EQ(file.tensor("embedding").numel(), std::uint64_t{6});
  CHECK_EQ(file.metadata_value("film_dim"), std::string("4"));
  CHECK(file.f32(file.tensor("film")) == kFilm);
  CHECK_THROWS(file.tensor("nope"), "prompt_cache.safetensors", "no tensor \"nope\"", "film");

  promptseg::PromptCache cache = promptseg::PromptCache::open(good);
  CHECK_EQ(cache.size(), std::size_t{3});
  CHECK_EQ(cache.film_dim(), std::size_t{4});
  CHECK_EQ(cache.embed_dim(), std::size_t{2});
  CHECK_EQ(cache.prompts()[2], std::string("caf\xC3\xA9 \"q\""));
  CHECK(cache.unique_targets() == (std::vector<std::string>{"liver", "left kidney"}));
  CHECK(cache.film_for("left kidney") == (std::vector<float>{0.0f, 1.0f, 2.0f, -3.0f}));
  CHECK(cache.film_for("Segment the liver") ==
        (std::vector<float>(kFilm.begin(), kFilm.begin() + 4)));
  CHECK(cache.embedding(2) == (std::vector<float>{0.25f, -0.75f}));
  auto exact = cache.find("left kidney");
  CHECK(exact.has_value() && exact->exact && exact->index == 1);
  auto loose = cache.find("  SEGMENT\tthe   Liver \n");
  CHECK(loose.has_value() && !loose->exact && loose->index == 0);
  CHECK(cache.find("CAF\xC3\xA9 \"Q\"").has_value());  // non-ASCII bytes kept as they are
  CHECK(!cache.find("liver").has_value());
  CHECK_EQ(promptseg::normalize_prompt("  A\t B  "), std::string("a b"));
  CHECK_EQ(promptseg::normalize_prompt("Where is the Liver ?!"), std::string("where is the liver"));
  CHECK_EQ(promptseg::normalize_prompt("dural-based tumour."), std::string("dural-based tumour"));
  CHECK_EQ(promptseg::normalize_prompt("x + y = z"), std::string("x + y = z"));
  CHECK_EQ(promptseg::normalize_prompt("?!"), std::string(""));
  CHECK(cache.find("left KIDNEY.").has_value());
  CHECK_THROWS(cache.film_for("spleen"), "prompt_cache.safetensors", "\"spleen\"",
               "known targets: liver, left kidney");

  // Corruptions: each names the file and says what is wrong.
  const std::string full = read_file(good);
  const fs::path bad = work / "bad.safetensors";
  write_file(bad, full.substr(0, full.size() - 4));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "truncated");
  write_file(bad, full + "xxxx");
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "trailing bytes");
  write_file(bad, full.substr(0, 5));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "8-byte header length");
  write_file(bad, full.substr(0, 40));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "runs past the end");
  write_file(bad, le64(1ULL << 40) + "{}");
  CHECK_THROWS(promptseg::PromptCache::open(bad), "100 MB");
  write_file(bad, safetensors_bytes("{\"film\": ", data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "header", "invalid JSON");
  write_file(bad, safetensors_bytes(cache_header("F16"), data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "data_offsets span 48 bytes", "needs 24");
  write_file(bad, safetensors_bytes(cache_header("Q4"), data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "dtype \"Q4\" is not supported");
  write_file(bad, safetensors_bytes(cache_header("F32", R"([\"only one\"])"), data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "1 prompts but 3 targets");
  write_file(bad, safetensors_bytes(cache_header("F32", "not json"), data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "__metadata__: invalid JSON");
  std::string gap = cache_header();
  gap.replace(gap.find("[48, 72]"), 8, "[52, 76]");
  write_file(bad, safetensors_bytes(gap, data + "0000"));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "starts at byte 52", "expected 48");
  std::string no_format = cache_header();
  no_format.replace(no_format.find("promptseg-prompt-cache"), 22, "something-else-entirely");
  write_file(bad, safetensors_bytes(no_format, data));
  CHECK_THROWS(promptseg::PromptCache::open(bad), "format is \"something-else-entirely\"");
  CHECK_THROWS(promptseg::PromptCache::open(work / "absent.safetensors"), "absent.safetensors",
               "not found");
}

std::string manifest_text(const std::string& cache_sha, std::size_t cache_bytes,
                          const std::string& layout_second_offset = "2") {
  return std::string(R"({
  "format": "promptseg-engine", "version": 1, "created": "2024-01-01T00:00:00Z",
  "resolution": 32,
  "inputs": [{"name": "image", "shape": ["N", 1, 32, 32], "dtype": "float32"},
             {"name": "film", "shape": ["N", 4], "dtype": "float32"}],
  "outputs": [{"name": "logits", "shape": ["N", 1, 32, 32], "dtype": "float32"}],
  "film_dim": 4, "embed_dim": 2,
  "film_layout": [{"name": "film_gamma", "offset": 0, "size": 2},
                  {"name": "film_beta", "offset": )") +
         layout_second_offset + R"(, "size": 2}],
  "preprocessing": {"resolution": 32, "ct_window": [-150.0, 250.0],
                    "mr_percentiles": [0.5, 99.5], "orientation": "LAS",
                    "modalities": ["ct", "mr", "uint8"]},
  "orientation": {"axcodes": "LAS", "description": "rows: patient right -> left"},
  "targets": ["liver", "left kidney"],
  "graphs": {"fp32": "model.onnx", "int8": null},
  "tensorrt": {"version": "10.7.0", "gpu": "H200", "plan": "model.plan", "max_batch": 32},
  "files": {"prompt_cache.safetensors": {"sha256": ")" +
         cache_sha + R"(", "bytes": )" + std::to_string(cache_bytes) + R"(}}
})";
}

void test_manifest(const fs::path& work) {
  const fs::path engine = work / "engine";
  fs::create_directories(engine);
  const std::string cache = safetensors_bytes(cache_header(), le_floats(kFilm) +
                                                                   le_floats(kEmbedding));
  write_file(engine / "prompt_cache.safetensors", cache);
  const std::string sha = promptseg::sha256_hex(cache);
  write_file(engine / "manifest.json", manifest_text(sha, cache.size()));

  promptseg::Manifest m = promptseg::read_manifest(engine);
  CHECK_EQ(m.resolution, std::int64_t{32});
  CHECK_EQ(m.film_dim, std::int64_t{4});
  CHECK_EQ(m.embed_dim, std::int64_t{2});
  CHECK_EQ(m.inputs.size(), std::size_t{2});
  CHECK(m.input("image") != nullptr && m.input("image")->shape[0].is_dynamic());
  CHECK_EQ(m.input("image")->shape[0].symbol, std::string("N"));
  CHECK_EQ(m.input("film")->shape[1].value, std::int64_t{4});
  CHECK_EQ(m.output("logits")->dtype, std::string("float32"));
  CHECK_EQ(m.film_layout[1].name, std::string("film_beta"));
  CHECK_EQ(m.preprocessing.ct_window[0], -150.0);
  CHECK_EQ(m.preprocessing.mr_percentiles[1], 99.5);
  CHECK_EQ(m.axcodes, std::string("LAS"));
  CHECK(m.targets == (std::vector<std::string>{"liver", "left kidney"}));
  CHECK_EQ(m.graphs.size(), std::size_t{1});  // null graphs are skipped
  CHECK(m.tensorrt.has_value() && m.tensorrt->plan == "model.plan" && m.tensorrt->max_batch == 32);
  CHECK_EQ(m.files.size(), std::size_t{1});
  CHECK_EQ(m.files[0].bytes, static_cast<std::int64_t>(cache.size()));
  CHECK_EQ(promptseg::verify_files(engine).size(), std::size_t{1});
  promptseg::PromptCache pc = promptseg::PromptCache::open(m);
  CHECK_EQ(pc.size(), std::size_t{3});

  // Same size, one byte changed: only the hash notices.
  std::string flipped = cache;
  flipped[flipped.size() - 1] ^= 0x01;
  write_file(engine / "prompt_cache.safetensors", flipped);
  promptseg::check_files_present(m);
  CHECK_THROWS(promptseg::verify_files(engine), "prompt_cache.safetensors", "sha256 mismatch",
               sha.c_str());
  write_file(engine / "prompt_cache.safetensors", cache + "x");
  const std::string grown = std::to_string(cache.size() + 1) + " bytes";
  CHECK_THROWS(promptseg::check_files_present(m), "prompt_cache.safetensors", grown.c_str());
  fs::remove(engine / "prompt_cache.safetensors");
  CHECK_THROWS(promptseg::verify_files(engine), "prompt_cache.safetensors", "missing");

  const fs::path where = engine / "manifest.json";
  auto bad = [&](const std::string& text) { return promptseg::parse_manifest(text, where); };
  const std::string ok = manifest_text(sha, cache.size());
  auto without = [&](const std::string& from, const std::string& to) {
    std::string t = ok;
    std::size_t at = t.find(from);
    if (at == std::string::npos) {
      report(__FILE__, __LINE__, "test setup: '" + from + "' not in the manifest");
      return t;
    }
    return t.replace(at, from.size(), to);
  };
  CHECK_THROWS(bad(without(R"("film_dim": 4, )", "")), "manifest.json", "field 'film_dim'",
               "missing");
  CHECK_THROWS(bad(without(R"("resolution": 32,)", R"("resolution": "32",)")),
               "field 'resolution'", "expected an integer, got string");
  CHECK_THROWS(bad(manifest_text(sha, cache.size(), "3")), "field 'film_layout[1].offset'",
               "expected 2");
  CHECK_THROWS(bad(without(R"("film_dim": 4)", R"("film_dim": 5)")),
               "field 'inputs[1].shape[1]'", "expected 5 (film_dim), got 4");
  CHECK_THROWS(bad(without(R"(["N", 1, 32, 32], "dtype": "float32"},
             {"name": "film")",
                           R"(["N", 1, 64, 64], "dtype": "float32"},
             {"name": "film")")),
               "field 'inputs[0].shape[2]'", "resolution");
  CHECK_THROWS(bad(without(R"("axcodes": "LAS")", R"("axcodes": "LLS")")),
               "field 'orientation.axcodes'", "same axis twice");
  CHECK_THROWS(bad(without(R"("axcodes": "LAS")", R"("axcodes": "RAS")")),
               "disagrees with preprocessing.orientation");
  CHECK_THROWS(bad(without(R"("ct_window": [-150.0, 250.0])", R"("ct_window": [-150.0])")),
               "field 'preprocessing.ct_window'", "list of 2 numbers");
  CHECK_THROWS(bad(without(R"("version": 1,)", R"("version": 2,)")), "field 'version'",
               "got 2");
  CHECK_THROWS(bad(without(R"("format": "promptseg-engine")", R"("format": "onnx")")),
               "field 'format'");
  CHECK_THROWS(bad(without(R"("files": {"prompt_cache.safetensors")",
                           R"("files": {"../prompt_cache.safetensors")")),
               "not a file name inside the engine folder");
  CHECK_THROWS(bad(without(sha, "abc")), "field 'files.prompt_cache.safetensors.sha256'",
               "64 hex digits");
  CHECK_THROWS(bad(without(R"("plan": "model.plan")", R"("plan": "/etc/passwd")")),
               "field 'tensorrt.plan'");
  CHECK_THROWS(bad("[1, 2]"), "manifest.json", "top level");
  CHECK_THROWS(bad(without(R"("resolution": 32,)", R"("resolution": 32.5,)")),
               "field 'resolution'", "expected an integer, got 32.5");
  CHECK(bad(without(R"("resolution": 32,)", R"("resolution": 32.0,)")).resolution == 32);

  // Malformed JSON: the file, "invalid JSON" and where, on one line (line and column as
  // Python's json module reports them for the same text).
  CHECK_THROWS(bad("{\"format\": "), "manifest.json", "invalid JSON at line 1");
  CHECK_THROWS(bad(ok.substr(0, ok.size() - 3)), "manifest.json",
               "invalid JSON at line 17, column 133");
  CHECK_THROWS(bad(without(R"("version": 1,)", R"('version': 1,)")), "manifest.json",
               "invalid JSON at line 2, column 33");
  CHECK_THROWS(bad(without(R"("int8": null})", R"("int8": null,})")), "manifest.json",
               "invalid JSON at line 15, column 49");
  CHECK_THROWS(bad(without(R"("max_batch": 32)", R"("max_batch": NaN)")), "manifest.json",
               "invalid JSON at line 16, column 87");
  CHECK_THROWS(bad(without(R"("max_batch": 32)", R"("max_batch": 1e400)")), "manifest.json",
               "invalid JSON", "1e400");
  CHECK_THROWS(bad(without(R"(["liver", "left kidney"])", "[\"liver\", \"left \xC3 kidney\"]")),
               "manifest.json", "invalid JSON at line 14, column 31", "UTF-8");
  CHECK_THROWS(bad(without(R"("liver", "left kidney")", R"("liver", "\ud83d")")),
               "manifest.json", "invalid JSON at line 14, column 31", "surrogate");
  // What Python's json module also accepts: a BOM-less UTF-8 file with \u escapes and a
  // repeated name (the last value wins).
  promptseg::Manifest escaped = bad(without(R"("left kidney"])", R"("caf\u00e9"])"));
  CHECK_EQ(escaped.targets[1], std::string("caf\xC3\xA9"));
  promptseg::Manifest repeated = bad(without(R"("resolution": 32,)",
                                             R"("resolution": 16, "resolution": 32,)"));
  CHECK_EQ(repeated.resolution, std::int64_t{32});
  CHECK_EQ(bad("\xEF\xBB\xBF" + ok).resolution, std::int64_t{32});
  CHECK_THROWS(promptseg::read_manifest(work / "no_such_engine"), "no_such_engine",
               "not a directory");
  CHECK_THROWS(promptseg::read_manifest(work), "manifest.json", "not found");
}

/// ``text`` with the one occurrence of ``from`` replaced (a test-setup failure otherwise).
std::string replaced(std::string text, const std::string& from, const std::string& to) {
  std::size_t at = text.find(from);
  if (at == std::string::npos) {
    report(__FILE__, __LINE__, "test setup: '" + from + "' not in the text");
    return text;
  }
  return text.replace(at, from.size(), to);
}

void test_presence(const fs::path& work) {
  const fs::path where = work / "engine" / "manifest.json";
  const std::string old = manifest_text(std::string(64, 'a'), 10);
  const std::string logits_only =
      R"("outputs": [{"name": "logits", "shape": ["N", 1, 32, 32], "dtype": "float32"}],)";
  const std::string with_presence =
      replaced(old, logits_only,
               R"("outputs": [{"name": "logits", "shape": ["N", 1, 32, 32], "dtype": "float32"},
              {"name": "presence", "shape": ["N", 1], "dtype": "float32"}],
  "presence_thresholds": {"liver": 0.25, "left kidney": 1},)");
  auto parse = [&](const std::string& text) { return promptseg::parse_manifest(text, where); };

  // An older engine: mask logits only, no thresholds.
  promptseg::Manifest before = parse(old);
  CHECK(!before.has_presence());
  CHECK(before.presence_thresholds.empty());
  CHECK(!before.presence_threshold("liver").has_value());

  promptseg::Manifest m = parse(with_presence);
  CHECK(m.has_presence());
  CHECK_EQ(m.outputs.size(), std::size_t{2});
  CHECK_EQ(m.outputs[1].name, std::string("presence"));
  CHECK_EQ(m.outputs[1].shape[1].value, std::int64_t{1});
  CHECK_EQ(m.presence_threshold("liver").value_or(-1.0), 0.25);
  CHECK_EQ(m.presence_threshold("left kidney").value_or(-1.0), 1.0);
  CHECK(!m.presence_threshold("spleen").has_value());
  // A threshold without the output is allowed (the schema does not tie them); so is null.
  CHECK_EQ(parse(replaced(with_presence, R"(,
              {"name": "presence", "shape": ["N", 1], "dtype": "float32"}])", "]"))
               .presence_thresholds.size(),
           std::size_t{2});
  CHECK(parse(replaced(old, R"("targets")", R"("presence_thresholds": null, "targets")"))
            .presence_thresholds.empty());

  CHECK_THROWS(parse(replaced(with_presence, R"("liver": 0.25)", R"("liver": 1.5)")),
               "manifest.json", "field 'presence_thresholds.liver'", "[0, 1], got 1.5");
  CHECK_THROWS(parse(replaced(with_presence, R"("liver": 0.25)", R"("liver": -0.1)")),
               "field 'presence_thresholds.liver'");
  CHECK_THROWS(parse(replaced(with_presence, R"("liver": 0.25)", R"("liver": "0.25")")),
               "field 'presence_thresholds.liver'", "expected a number, got string");
  CHECK_THROWS(parse(replaced(with_presence, R"({"liver": 0.25, "left kidney": 1})", "[0.5]")),
               "field 'presence_thresholds'", "expected an object, got array");
  CHECK_THROWS(parse(replaced(with_presence, R"(["N", 1], "dtype")", R"(["N", 1, 1], "dtype")")),
               "field 'outputs[1].shape'", "[N, 1]", "got 3 dimensions");
  CHECK_THROWS(parse(replaced(with_presence, R"(["N", 1], "dtype")", R"(["N", 2], "dtype")")),
               "field 'outputs[1].shape[1]'", "expected 1", "got 2");
  CHECK_THROWS(parse(replaced(with_presence, R"("name": "presence")", R"("name": "mask")")),
               "field 'outputs'", "[logits] or [logits, presence]");
  CHECK_THROWS(parse(replaced(old, R"("N", 1, 32, 32], "dtype": "float32"}],)",
                              R"("N", 1, 32], "dtype": "float32"}],)")),
               "field 'outputs[0].shape'", "logits must be [N, 1, R, R]");

  // Which tau applies: --no-presence-gate, --presence-threshold, else the manifest's.
  using promptseg::PresenceOptions;
  CHECK_EQ(promptseg::presence_tau(m, "liver", PresenceOptions{}).value_or(-1.0), 0.25);
  CHECK(!promptseg::presence_tau(m, "spleen", PresenceOptions{}).has_value());
  CHECK(!promptseg::presence_tau(m, "liver", PresenceOptions{false, 0.5}).has_value());
  CHECK_EQ(promptseg::presence_tau(m, "spleen", PresenceOptions{true, 0.5}).value_or(-1.0), 0.5);
  CHECK_EQ(promptseg::presence_tau(before, "liver", PresenceOptions{true, 0.0}).value_or(-1.0),
           0.0);
  CHECK_THROWS(promptseg::presence_tau(m, "liver", PresenceOptions{true, 1.5}),
               "--presence-threshold", "between 0 and 1");

  // The gate: 3 slices of 2 x 2; a slice goes empty where sigmoid(presence) < tau.
  CHECK_EQ(promptseg::sigmoid(0.0f), 0.5f);
  CHECK_EQ(promptseg::sigmoid(-200.0f), 0.0f);
  CHECK_EQ(promptseg::sigmoid(200.0f), 1.0f);
  CHECK(std::fabs(promptseg::sigmoid(-2.0f) - 0.11920292f) < 1e-7f);
  const std::vector<std::uint8_t> masks = {1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1};
  const std::vector<float> presence = {-2.0f, 0.0f, 3.0f};  // p = 0.119, 0.5, 0.953
  std::vector<std::uint8_t> gated = masks;
  promptseg::PresenceGate gate = promptseg::apply_presence_gate(presence, 0.5, gated, 4);
  CHECK(gated == (std::vector<std::uint8_t>{0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 1}));  // p = tau kept
  CHECK_EQ(gate.slices_gated, std::size_t{1});
  CHECK(gate.present);
  CHECK_EQ(gate.threshold.value_or(-1.0), 0.5);
  CHECK_EQ(gate.probabilities.size(), std::size_t{3});
  CHECK_EQ(gate.probabilities[1], 0.5f);
  CHECK_EQ(gate.max_probability().value_or(-1.0f), promptseg::sigmoid(3.0f));
  gated = masks;
  gate = promptseg::apply_presence_gate(presence, 0.96, gated, 4);
  CHECK(std::all_of(gated.begin(), gated.end(), [](std::uint8_t v) { return v == 0; }));
  CHECK_EQ(gate.slices_gated, std::size_t{3});
  CHECK(!gate.present);  // absent: an empty mask
  gated = masks;
  gate = promptseg::apply_presence_gate(presence, std::nullopt, gated, 4);  // no tau: no gate
  CHECK(gated == masks);
  CHECK(!gate.threshold.has_value() && gate.slices_gated == 0 && gate.probabilities.size() == 3);
  gate = promptseg::apply_presence_gate({}, 0.5, gated, 4);  // an engine without the output
  CHECK(gated == masks);
  CHECK(!gate.max_probability().has_value() && !gate.threshold.has_value() && gate.present);
  CHECK_THROWS(promptseg::apply_presence_gate({0.0f, 1.0f}, 0.5, gated, 4),
               "2 presence logits for 3 slices");
}

}  // namespace

int main(int argc, char** argv) {
  fs::path work = argc > 1 ? fs::path(argv[1]) : fs::temp_directory_path() / "promptseg_test";
  fs::remove_all(work);
  fs::create_directories(work);
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"json helpers", test_json_helpers},
      {"sha256", [&] { test_sha256(work); }},
      {"safetensors", [&] { test_safetensors(work); }},
      {"manifest", [&] { test_manifest(work); }},
      {"presence", [&] { test_presence(work); }},
  };
  for (const auto& [name, body] : tests) {
    int before = g_failures;
    try {
      body();
    } catch (const std::exception& e) {
      report(__FILE__, __LINE__, std::string(name) + ": unexpected exception: " + e.what());
    }
    std::printf("%-14s %s\n", name, g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
