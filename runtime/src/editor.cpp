#include "smartedit/editor.h"

#include <chrono>
#include <filesystem>
#include <stdexcept>

namespace smartedit {

namespace {
std::string package(const std::string& artifacts, const std::string& graph) {
  const std::filesystem::path p = std::filesystem::path(artifacts) / "aoti" / (graph + ".pt2");
  if (!std::filesystem::is_regular_file(p))
    throw std::runtime_error(p.string() + " not found: run smartedit-export --target aoti --out " + artifacts);
  return p.string();
}
}  // namespace

Editor::Editor(const std::string& artifacts, const c10::Device& device) : device_(device) {
  for (const char* graph : {"llava", "qformer_bim", "vae_encoder", "vae_decoder"})
    graphs_[graph] = std::make_unique<Package>(package(artifacts, graph), device);
  denoiser_ = std::make_unique<Denoiser>(package(artifacts, "unet"), device);
}

std::vector<at::Tensor> Editor::call(const std::string& graph, const std::vector<at::Tensor>& inputs) {
  return graphs_.at(graph)->run(inputs);  // cast to the package's dtypes, contiguous, on its device
}

at::Tensor Editor::run(const EditInputs& x, const DenoiseOptions& o, std::map<std::string, double>* stage_ms) {
  const int64_t b = x.pixel_values.dim() == 4 ? x.pixel_values.size(0) : -1;
  if (b < 1 || x.prefix_ids.dim() != 2 || x.suffix_ids.dim() != 2 || x.image.dim() != 4 ||
      x.prefix_ids.size(0) != b || x.suffix_ids.size(0) != b || x.image.size(0) != b)
    throw std::invalid_argument("pixel_values [B,3,224,224], prefix_ids [B,Lp], suffix_ids [B,Ls] and image "
                                "[B,3,H,W] must share the batch B");
  if (at::isFloatingType(x.prefix_ids.scalar_type()) || at::isFloatingType(x.suffix_ids.scalar_type()))
    throw std::invalid_argument("prefix_ids and suffix_ids must hold integer token ids");
  auto clock = std::chrono::steady_clock::now();
  const auto lap = [&](const char* stage, const at::Tensor& done) {
    if (!stage_ms) return;
    if (device_.is_cuda()) done.cpu();  // synchronise before reading the clock
    const auto now = std::chrono::steady_clock::now();
    (*stage_ms)[stage] = std::chrono::duration<double, std::milli>(now - clock).count();
    clock = now;
  };
  const auto llava = call("llava", {x.pixel_values, x.prefix_ids, x.suffix_ids});  // img_hidden, clip_feats
  const auto cond = call("qformer_bim", {llava[0], llava[1]});                      // prompt_embeds, bim_residual
  lap("condition", cond[0]);
  const at::Tensor latents = call("vae_encoder", {x.image})[0];                     // [B,4,H/8,W/8]
  lap("vae_encode", latents);
  const at::Tensor denoised = denoiser_->run({latents, cond[0], x.null_text_embeds, cond[1]}, o);  // casts
  lap("denoise", denoised);
  const at::Tensor image = call("vae_decoder", {denoised})[0];                      // [B,3,H,W]
  lap("vae_decode", image);
  return image;
}

}  // namespace smartedit
