#include "tensor_io.h"

#include <ATen/ATen.h>

#include "formats/checkpoint_files.h"
#include "formats/safetensors_writer.h"
#include "loadkit/error.h"

namespace loadkit {

using safetensors::DType;

namespace {
struct Pair {
  DType dtype;
  at::ScalarType type;
};
constexpr Pair kPairs[] = {
    {DType::BOOL, at::kBool},   {DType::U8, at::kByte},        {DType::I8, at::kChar},
    {DType::I16, at::kShort},   {DType::U16, at::kUInt16},     {DType::I32, at::kInt},
    {DType::U32, at::kUInt32},  {DType::I64, at::kLong},       {DType::U64, at::kUInt64},
    {DType::F16, at::kHalf},    {DType::BF16, at::kBFloat16},  {DType::F32, at::kFloat},
    {DType::F64, at::kDouble},  {DType::F8_E4M3, at::kFloat8_e4m3fn}, {DType::F8_E5M2, at::kFloat8_e5m2},
};
}  // namespace

at::ScalarType to_scalar_type(DType dtype) {
  for (const auto& p : kPairs)
    if (p.dtype == dtype) return p.type;
  fail(ErrorKind::Input, "dtype ", safetensors::dtype_name(dtype), " has no torch equivalent");
}

DType to_safetensors_dtype(at::ScalarType type) {
  for (const auto& p : kPairs)
    if (p.type == type) return p.dtype;
  fail(ErrorKind::Usage, "dtype ", c10::toString(type), " cannot be stored in safetensors");
}

at::Tensor read_tensor(const safetensors::SafetensorsFile& file, const safetensors::TensorInfo& info) {
  at::Tensor t = at::empty(info.shape, at::TensorOptions().dtype(to_scalar_type(info.dtype)));
  file.read(info, t.data_ptr());
  return t;
}

at::Tensor meta_tensor_of(const safetensors::TensorInfo& info) {
  return at::empty(info.shape, at::TensorOptions().dtype(to_scalar_type(info.dtype)).device(at::kMeta));
}

void save_tensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<at::Tensor> host;
  std::vector<safetensors::TensorBlob> blobs;
  host.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    host.push_back(t.to(at::kCPU).contiguous());
    const at::Tensor& h = host.back();
    blobs.push_back({name, to_safetensors_dtype(h.scalar_type()), h.sizes().vec(), h.data_ptr(),
                     static_cast<uint64_t>(h.nbytes())});
  }
  safetensors::write_file(path, blobs);
}

std::vector<std::pair<std::string, at::Tensor>> load_tensors(const std::string& path) {
  auto file = safetensors::SafetensorsFile::open(path);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& info : file->tensors()) out.emplace_back(info.name, read_tensor(*file, info));
  return out;
}

std::vector<NamedWeight> read_checkpoint(const std::string& dir) {
  const auto checkpoint = safetensors::open_checkpoint(dir);
  std::vector<NamedWeight> out;
  for (const auto& file : checkpoint.files)
    for (const auto& info : file->tensors()) out.push_back({info.name, read_tensor(*file, info), file->path()});
  return out;
}

}  // namespace loadkit
