// nlohmann::json parsing of files from the internet with a nesting limit: the parser itself is iterative, but
// dumping or converting a value 100000 levels deep recurses until the stack overflows.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "common.h"

namespace gemmalens {

constexpr int kMaxJsonDepth = 64;  // HF configs, safetensors headers and index files nest 3-4 levels

// Throws json::parse_error for bad JSON (callers report it with the file's name) and CheckpointError for nesting
// deeper than kMaxJsonDepth.
template <class It>
nlohmann::json parse_json_limited(It first, It last, const std::string& what) {
  return nlohmann::json::parse(first, last, [&](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
    if (depth > kMaxJsonDepth)
      throw CheckpointError(what + " nests JSON deeper than " + std::to_string(kMaxJsonDepth) + " levels (file corrupt?)");
    return true;
  });
}

}  // namespace gemmalens
