#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "common.h"
#include "json_limits.h"

namespace gemmalens {
using json = nlohmann::json;

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw IOError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IOError("'" + path + "' is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw IOError("cannot mmap '" + path + "': " + std::strerror(errno));
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
}

int64_t TensorInfo::numel() const {
  // Dimensions come from the file: their product can overflow (a tensor "of 2^128 elements" with 16 bytes).
  int64_t n;
  if (!numel_checked(shape, n))
    throw CheckpointError("tensor '" + name + "' has shape " + shape_str(shape) + ", whose element count overflows (file corrupt?)");
  return n;
}


static size_t dtype_size(const std::string& dt) {
  if (dt == "F64" || dt == "I64" || dt == "U64") return 8;
  if (dt == "F32" || dt == "I32" || dt == "U32") return 4;
  if (dt == "F16" || dt == "BF16" || dt == "I16" || dt == "U16") return 2;
  if (dt == "I8" || dt == "U8" || dt == "BOOL" || dt == "F8_E4M3" || dt == "F8_E5M2") return 1;
  return 0;
}

void TensorStore::add_file(const std::string& path) {
  auto f = std::make_unique<MappedFile>(path);
  const std::string where = "safetensors file '" + path + "'";
  if (f->size() < 8) throw CheckpointError(where + " is truncated: " + std::to_string(f->size()) + " bytes, the 8-byte header length alone is missing");
  uint64_t hlen = 0;
  std::memcpy(&hlen, f->data(), 8);  // little-endian on x86
  // The safetensors format caps its JSON header at 100 MB (a parsed header costs several times its size).
  if (hlen > (100u << 20))
    throw CheckpointError(where + " is corrupt: header length " + std::to_string(hlen) + " exceeds the format's 100 MB limit");
  if (hlen > f->size() - 8)
    throw CheckpointError(where + " is truncated or corrupt: header length " + std::to_string(hlen) + " runs past the end of the file (" +
                          std::to_string(f->size()) + " bytes)");
  json header;
  try {
    header = parse_json_limited(reinterpret_cast<const char*>(f->data()) + 8, reinterpret_cast<const char*>(f->data()) + 8 + hlen, where);
  } catch (const json::exception& e) {
    throw CheckpointError(where + " has a corrupt header (bad JSON): " + e.what());
  }
  if (!header.is_object()) throw CheckpointError(where + " has a corrupt header: not a JSON object");
  const uint8_t* base = f->data() + 8 + hlen;
  const size_t data_size = f->size() - 8 - hlen;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& v = it.value();
    TensorInfo t;
    t.name = it.key();
    t.file = path;
    try {
      t.dtype = v.at("dtype").get<std::string>();
      t.shape = v.at("shape").get<std::vector<int64_t>>();
      auto off = v.at("data_offsets").get<std::vector<uint64_t>>();
      if (off.size() != 2) throw CheckpointError("data_offsets must have 2 entries");
      if (off[0] > off[1] || off[1] > data_size)
        throw CheckpointError(where + ": tensor '" + t.name + "' has data_offsets [" + std::to_string(off[0]) + ", " + std::to_string(off[1]) +
                              "] outside the data section (" + std::to_string(data_size) + " bytes): the file is truncated or corrupt");
      for (auto d : t.shape)
        if (d < 0) throw CheckpointError(where + ": tensor '" + t.name + "' has a negative dimension");
      size_t es = dtype_size(t.dtype);
      if (es == 0) throw CheckpointError(where + ": tensor '" + t.name + "' has unknown dtype '" + t.dtype + "'");
      t.nbytes = off[1] - off[0];
      if (t.shape.size() > 8) throw CheckpointError(where + ": tensor '" + t.name + "' has " + std::to_string(t.shape.size()) + " dimensions");
      uint64_t want = 0;
      if (__builtin_mul_overflow(static_cast<uint64_t>(t.numel()), static_cast<uint64_t>(es), &want) || want != t.nbytes)
        throw CheckpointError(where + ": tensor '" + t.name + "' of shape " + shape_str(t.shape) + " and dtype " + t.dtype + " needs " +
                              std::to_string(t.numel() * es) + " bytes but data_offsets give " + std::to_string(t.nbytes));
      t.data = base + off[0];
    } catch (const json::exception& e) {
      throw CheckpointError(where + ": bad header entry for '" + t.name + "': " + e.what());
    }
    if (tensors_.count(t.name)) throw CheckpointError("tensor '" + t.name + "' appears in two files ('" + tensors_[t.name].file + "' and '" + path + "')");
    tensors_[t.name] = std::move(t);
  }
  files_.push_back(std::move(f));
}

static bool is_dir(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
static bool is_file(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::shared_ptr<TensorStore> TensorStore::open(const std::string& path) {
  auto store = std::make_shared<TensorStore>();
  if (is_file(path)) {
    store->add_file(path);
    return store;
  }
  if (!is_dir(path)) throw IOError("no such file or directory: '" + path + "'");
  const std::string index = path + "/model.safetensors.index.json";
  if (is_file(index)) {
    std::ifstream in(index);
    std::stringstream ss;
    ss << in.rdbuf();
    json j;
    try {
      const std::string text = ss.str();
      j = parse_json_limited(text.begin(), text.end(), "'" + index + "'");
    } catch (const json::exception& e) {
      throw CheckpointError("'" + index + "' is not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw CheckpointError("'" + index + "' has no 'weight_map' object");
    std::set<std::string> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) throw CheckpointError("'" + index + "': weight_map['" + it.key() + "'] is not a file name");
      std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos) throw CheckpointError("'" + index + "': shard name '" + shard + "' must be a plain file name");
      shards.insert(shard);
    }
    for (const auto& s : shards) {
      if (!is_file(path + "/" + s)) throw CheckpointError("'" + index + "' names shard '" + s + "', which is missing from the directory");
      store->add_file(path + "/" + s);
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it)
      if (!store->find(it.key()))
        throw CheckpointError("'" + index + "' maps tensor '" + it.key() + "' to '" + it.value().get<std::string>() + "', which does not hold it");
    return store;
  }
  if (is_file(path + "/model.safetensors")) {
    store->add_file(path + "/model.safetensors");
    return store;
  }
  throw CheckpointError("directory '" + path + "' holds no weights: expected model.safetensors or model.safetensors.index.json");
}

void TensorStore::release(const TensorInfo& t) { release(t.data, t.nbytes); }

void TensorStore::release(const uint8_t* data, size_t nbytes) {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + nbytes) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

const TensorInfo* TensorStore::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

void tensor_to_f32(const TensorInfo& t, float* out) {
  const int64_t n = t.numel();
  // Ask the kernel to read the whole tensor ahead (a checkpoint larger than the page cache streams from disk), then
  // convert on every thread: the page faults of the mapping are taken in parallel too.
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t.data) / page * page;
  const uintptr_t hi = reinterpret_cast<uintptr_t>(t.data) + t.nbytes;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_WILLNEED);
  if (t.dtype == "F32") {
#pragma omp parallel for if (n > (1 << 20)) schedule(static)
    for (int64_t c = 0; c < (n + 65535) / 65536; ++c) {
      const int64_t i0 = c * 65536, m = std::min<int64_t>(65536, n - i0);
      std::memcpy(out + i0, t.data + 4 * i0, m * 4);
    }
  } else if (t.dtype == "BF16") {
#pragma omp parallel for if (n > (1 << 20)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      out[i] = bf16_to_f32(h);
    }
  } else if (t.dtype == "F16") {
#pragma omp parallel for if (n > (1 << 20)) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);
      out[i] = f16_to_f32(h);
    }
  } else {
    throw CheckpointError("tensor '" + t.name + "' has dtype " + t.dtype + "; only F32, F16 and BF16 are supported");
  }
}

}  // namespace gemmalens
