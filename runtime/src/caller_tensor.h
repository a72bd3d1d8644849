#pragma once
/// \file
/// Tensors a caller hands in — an update's chunk, an FSDP rank's shards, a
/// sender's weights — must hold plain data that a copy can read: a defined,
/// dense (strided) tensor with storage, on the CPU or a CUDA device, of a
/// plain dtype. torch refuses anything else (a sparse, mkldnn or nested
/// tensor, a meta tensor, a quantized one, a functionalized wrapper) only at
/// the copy, which for an update comes after other tensors of the same chunk
/// were written and leaves the model half new. So each is checked on arrival,
/// before validation, and refused as an Input error naming the tensor: a chunk
/// is then rejected whole, as validation rejects a wrong shape.

#include <string_view>

namespace at {
class Tensor;
}

namespace loadkit {

/// Throws an Input error "<origin>: tensor '<name>' is <what it is>; <what to pass>" unless
/// `tensor` holds plain data (the file comment). Costs a few field reads.
void require_plain_data(const at::Tensor& tensor, std::string_view origin, std::string_view name);

}  // namespace loadkit
