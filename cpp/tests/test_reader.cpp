// ctest: JSON edge cases, SHA-256 vectors, a synthetic safetensors prompt cache and manifest.
//
// usage: test_reader WORK_DIR   (files are written there; no external data needed)
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

void test_json_values() {
  json::Value v = json::parse(R"( {"b": [1, -2.5], "a": {"n": {}},
      "b": 7, "e": [] } )");
  CHECK(v.is_object());
  CHECK_EQ(v.size(), std::size_t{3});
  CHECK_EQ(v.key_at(0), std::string("b"));  // order of first appearance
  CHECK(v.find("b")->is_integer());
  CHECK_EQ(v.find("b")->as_int(), std::int64_t{7});  // duplicate name: last value wins
  CHECK(v.find("a")->find("n")->is_object());
  CHECK_EQ(v.find("a")->find("n")->size(), std::size_t{0});
  CHECK(v.find("e")->is_array());
  CHECK(v.find("missing") == nullptr);

  json::Value arr = json::parse("[1, -2.5, true, false, null, \"x\"]");
  CHECK_EQ(arr.size(), std::size_t{6});
  CHECK_EQ(arr.at(1).as_double(), -2.5);
  CHECK(!arr.at(1).is_integer());
  CHECK(arr.at(2).as_bool());
  CHECK(!arr.at(3).as_bool());
  CHECK(arr.at(4).is_null());
  CHECK_EQ(arr.at(5).as_string(), std::string("x"));
  CHECK_THROWS(arr.at(6), "out of range");
  CHECK_THROWS(arr.at(5).as_int(), "expected number, got string");

  CHECK(json::parse("\xEF\xBB\xBF{\"bom\": 1}").find("bom") != nullptr);
}

void test_json_strings() {
  CHECK_EQ(json::parse(R"("\"\\\/\b\f\n\r\t")").as_string(), std::string("\"\\/\b\f\n\r\t"));
  CHECK_EQ(json::parse(R"("caf\u00e9")").as_string(), std::string("caf\xC3\xA9"));
  CHECK_EQ(json::parse(R"("\u20AC")").as_string(), std::string("\xE2\x82\xAC"));
  CHECK_EQ(json::parse(R"("\ud83d\ude00")").as_string(), std::string("\xF0\x9F\x98\x80"));
  CHECK_EQ(json::parse(R"("\u0000")").as_string(), std::string(1, '\0'));
  CHECK_EQ(json::parse("\"raw \xC3\xA9 \xF0\x9F\x98\x80\"").as_string(),
           std::string("raw \xC3\xA9 \xF0\x9F\x98\x80"));
  CHECK_THROWS(json::parse(R"("\ud83d")"), "high surrogate");
  CHECK_THROWS(json::parse(R"("\ude00")"), "lone low surrogate");
  CHECK_THROWS(json::parse(R"("\ud83d\u0041")"), "high surrogate");
  CHECK_THROWS(json::parse(R"("\u12G4")"), "invalid hex digit");
  CHECK_THROWS(json::parse(R"("\x")"), "invalid escape");
  CHECK_THROWS(json::parse("\"tab\there\""), "control character");
  CHECK_THROWS(json::parse("\"bad \xC3\""), "UTF-8");
  CHECK_THROWS(json::parse("\"over \xC0\xAF\""), "UTF-8");
  CHECK_THROWS(json::parse("\"surrogate \xED\xA0\x80\""), "UTF-8");
  CHECK_THROWS(json::parse("\"open"), "unterminated string");
}

void test_json_numbers() {
  CHECK_EQ(json::parse("0").as_int(), std::int64_t{0});
  CHECK_EQ(json::parse("-0").as_int(), std::int64_t{0});
  CHECK(json::parse("1e3").is_number());
  CHECK(!json::parse("1e3").is_integer());
  CHECK_EQ(json::parse("1e3").as_int(), std::int64_t{1000});
  CHECK_EQ(json::parse("2.0").as_int(), std::int64_t{2});
  CHECK_THROWS(json::parse("2.5").as_int(), "expected an integer");
  CHECK_EQ(json::parse("9223372036854775807").as_int(), std::numeric_limits<std::int64_t>::max());
  CHECK_EQ(json::parse("-9223372036854775808").as_int(),
           std::numeric_limits<std::int64_t>::min());
  CHECK(!json::parse("9223372036854775808").is_integer());
  CHECK_EQ(json::parse("9223372036854775808").as_double(), 9223372036854775808.0);
  CHECK_EQ(json::parse("1.5e-7").as_double(), 1.5e-7);
  CHECK_EQ(json::parse("-12.375E+2").as_double(), -1237.5);
  CHECK_EQ(json::parse("0.1").as_double(), 0.1);
  CHECK_THROWS(json::parse("01"), "leading zeros");
  CHECK_THROWS(json::parse("1."), "decimal point");
  CHECK_THROWS(json::parse("-"), "digit");
  CHECK_THROWS(json::parse(".5"), "unexpected '.'");
  CHECK_THROWS(json::parse("1e"), "exponent");
  CHECK_THROWS(json::parse("1e400"), "outside the double range");
  CHECK_THROWS(json::parse("+1"), "unexpected '+'");
}

void test_json_syntax() {
  CHECK_THROWS(json::parse(""), "empty document");
  CHECK_THROWS(json::parse("   "), "empty document");
  CHECK_THROWS(json::parse("[1,]"), "expected a value");
  CHECK_THROWS(json::parse(R"({"a": 1,})"), "member name");
  CHECK_THROWS(json::parse(R"({'a': 1})"), "member name");
  CHECK_THROWS(json::parse(R"({"a" 1})"), "expected ':'");
  CHECK_THROWS(json::parse("[1 2]"), "expected ',' or ']'");
  CHECK_THROWS(json::parse("1 2"), "after the document");
  CHECK_THROWS(json::parse("tru"), "expected 'true'");
  CHECK_THROWS(json::parse("nul"), "expected 'null'");
  CHECK_THROWS(json::parse("[NaN]"), "unexpected 'N'");
  CHECK_THROWS(json::parse("{\n  \"a\": [1,\n  ?]\n}"), "line 3, column 3");
  std::string deep(600, '[');
  deep += std::string(600, ']');
  CHECK_THROWS(json::parse(deep), "nesting deeper than 512");
  CHECK(json::parse(std::string(100, '[') + std::string(100, ']')).is_array());
}

void test_json_dump() {
  CHECK_EQ(json::dump(json::Value(0.1)), std::string("0.1"));
  CHECK_EQ(json::dump(json::Value(1.0)), std::string("1.0"));
  CHECK_EQ(json::dump(json::Value(static_cast<double>(0.1f))),
           std::string("0.10000000149011612"));
  CHECK_EQ(json::dump(json::Value(std::nan(""))), std::string("null"));
  CHECK_EQ(json::dump(json::Value(std::int64_t{-42})), std::string("-42"));
  CHECK_EQ(json::dump(json::Value(std::string("a\"b\\c\n\x01\xC3\xA9"))),
           std::string("\"a\\\"b\\\\c\\n\\u0001\xC3\xA9\""));
  json::Value obj = json::Value::object();
  obj.set("x", json::Value::array());
  obj.set("y", std::string("z"));
  obj.set("x", 3);  // replace keeps position
  CHECK_EQ(json::dump(obj), std::string(R"({"x": 3, "y": "z"})"));
  std::string text = R"({"a": [1, 2.5, "\u00e9\ud83d\ude00", {"b": null}], "c": true})";
  json::Value once = json::parse(text);
  CHECK_EQ(json::dump(json::parse(json::dump(once, 2))), json::dump(once));
  // Every float32 survives a print/parse round trip exactly.
  for (float f : {1.0f / 3.0f, -7.25e-12f, 3.4028235e38f, 1.1754944e-38f, 0.0f}) {
    double back = json::parse(json::dump(json::Value(static_cast<double>(f)))).as_double();
    CHECK_EQ(static_cast<float>(back), f);
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
  CHECK_THROWS(promptseg::PromptCache::open(bad), "bad.safetensors", "__metadata__");
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
  CHECK_THROWS(bad("{\"format\": "), "manifest.json", "invalid JSON at line 1");
  CHECK_THROWS(promptseg::read_manifest(work / "no_such_engine"), "no_such_engine",
               "not a directory");
  CHECK_THROWS(promptseg::read_manifest(work), "manifest.json", "not found");
}

}  // namespace

int main(int argc, char** argv) {
  fs::path work = argc > 1 ? fs::path(argv[1]) : fs::temp_directory_path() / "promptseg_test";
  fs::remove_all(work);
  fs::create_directories(work);
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"json values", test_json_values},
      {"json strings", test_json_strings},
      {"json numbers", test_json_numbers},
      {"json syntax", test_json_syntax},
      {"json dump", test_json_dump},
      {"sha256", [&] { test_sha256(work); }},
      {"safetensors", [&] { test_safetensors(work); }},
      {"manifest", [&] { test_manifest(work); }},
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
