// Error messages built without iostreams, and LORA_CHECK, which raises them as TORCH_CHECK does.
//
// Why: TORCH_CHECK formats mixed arguments through a std::ostringstream instantiated in this library.
// Where a toolchain links libstdc++ statically into extensions (seen on one GPU image: g++ 13 there
// did), that stream runs on a second copy of libstdc++ whose locale was never set up, and formatting an
// integer crashes the process instead of raising the error. Concatenating std::strings avoids
// streams entirely; TORCH_CHECK with one std::string argument passes it through unformatted.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace lora_ext {
namespace message_detail {

inline void append(std::string& out, const char* text) { out += text; }
inline void append(std::string& out, const std::string& text) { out += text; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, int value) { out += std::to_string(value); }
inline void append(std::string& out, long value) { out += std::to_string(value); }
inline void append(std::string& out, long long value) { out += std::to_string(value); }
inline void append(std::string& out, unsigned long value) { out += std::to_string(value); }
inline void append(std::string& out, double value) { out += std::to_string(value); }
inline void append(std::string& out, c10::ScalarType dtype) { out += c10::toString(dtype); }
inline void append(std::string& out, const c10::Device& device) { out += device.str(); }
inline void append(std::string& out, c10::IntArrayRef sizes) {
  out += '(';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += sizes.size() == 1 ? ",)" : ")";
}

}  // namespace message_detail

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::string out;
  (message_detail::append(out, parts), ...);
  return out;
}

}  // namespace lora_ext

// TORCH_CHECK(cond, parts...) with the message concatenated as above; parts are evaluated only on failure.
#define LORA_CHECK(cond, ...) TORCH_CHECK(cond, ::lora_ext::concat(__VA_ARGS__))
