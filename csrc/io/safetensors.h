// Native safetensors reader: mmap, bounds-checked header parsing, single file or sharded
// (model.safetensors.index.json). Format: 8-byte little-endian header length, a JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}} with offsets relative to the end of the header.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace gemmalens {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);  // throws IOError
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

struct TensorInfo {
  std::string name;
  std::string dtype;            // "F32" | "F16" | "BF16" (others listed but not convertible)
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping
  size_t nbytes = 0;
  std::string file;
  int64_t numel() const;
};

// All tensors of a checkpoint (one or several files), kept mapped for the store's lifetime.
class TensorStore {
 public:
  // `path`: a .safetensors file, a directory with model.safetensors, or one with model.safetensors.index.json.
  static std::shared_ptr<TensorStore> open(const std::string& path);
  void add_file(const std::string& path);
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  // Drop the tensor's pages from this process (they are file-backed and read-only): keeps peak RSS near the
  // size of the converted weights while loading.
  static void release(const TensorInfo& t);
  static void release(const uint8_t* data, size_t nbytes);  // the same for any range of a read-only mapping

 private:
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
};

// Convert a F32/F16/BF16 tensor to f32 (`out` holds numel floats); throws CheckpointError otherwise.
void tensor_to_f32(const TensorInfo& t, float* out);

}  // namespace gemmalens
