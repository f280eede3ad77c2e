#include "smartedit/editor.h"

#include <chrono>
#include <stdexcept>
#include <vector>

#include "smartedit/checks.h"

namespace smartedit {

int64_t check_deepcache(const Manifest& m, int64_t interval) {
  check_deepcache_interval(interval);
  if (interval == 1) return -1;
  const GraphArtifact* deep = nullptr;
  const GraphArtifact* shallow = nullptr;
  try {
    deep = &m.graph("unet_deep");
    shallow = &m.graph("unet_shallow");
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument("DeepCache interval " + std::to_string(interval) + ": the export in " + m.dir() +
                                " has no DeepCache graphs (unet_deep, unet_shallow): export them with "
                                "smartedit-export --target aoti --deepcache [BRANCH] --out " + m.dir());
  }
  if (deep->cache_branch < 0 || deep->cache_branch != shallow->cache_branch)
    throw std::invalid_argument("DeepCache interval " + std::to_string(interval) + ": the unet_deep and unet_shallow "
                                "entries in " + m.dir() + " do not record one skip branch (options.cache_branch " +
                                std::to_string(deep->cache_branch) + " and " + std::to_string(shallow->cache_branch) +
                                ", -1: none): re-run smartedit-export --target aoti --deepcache [BRANCH] --out " +
                                m.dir());
  return deep->cache_branch;
}

Editor::Editor(const std::string& artifacts, const c10::Device& device)
    : manifest_(Manifest::load(artifacts, "aoti")), device_(device) {
  // the graphs this edit calls, as the Python pipeline does; the unet runs inside the Denoiser's loop. Every file is
  // checked against its sha256 before any package reaches libtorch's loader: a damaged folder is refused before the
  // (slow) loads, not half way through them
  const std::vector<std::string> called = {"llava", "qformer_bim", "vae_encoder", "vae_decoder"};
  for (const auto& graph : called) manifest_.open(graph);
  manifest_.open("unet");
  for (const auto& graph : called) graphs_[graph] = std::make_unique<Package>(manifest_.open(graph).file, device);
  denoiser_ = std::make_unique<Denoiser>(manifest_.open("unet").file, device);
}

int64_t Editor::cache_branch() const {
  try {
    return check_deepcache(manifest_, 2);
  } catch (const std::invalid_argument&) {
    return -1;
  }
}

std::vector<at::Tensor> Editor::call(const std::string& graph, const std::vector<at::Tensor>& inputs) {
  const GraphSpec& spec = manifest_.graph(graph).spec;
  spec.check(inputs);                                  // shapes against the exported profile, naming what does not fit
  auto outputs = graphs_.at(graph)->run(inputs);      // cast to the package's dtypes, contiguous, on its device
  for (size_t i = 0; i < outputs.size(); ++i)  // finite inputs, non-finite result: the run failed, at this stage
    check_finite_result(outputs[i], "the " + graph + " graph's output " +
                                        (i < spec.outputs.size() ? spec.outputs[i].name : std::to_string(i)));
  return outputs;
}

at::Tensor Editor::run(const EditInputs& x, const DenoiseOptions& o, std::map<std::string, double>* phase_ms) {
  if (!x.prefix_ids.defined() || !x.suffix_ids.defined() || at::isFloatingType(x.prefix_ids.scalar_type()) ||
      at::isFloatingType(x.suffix_ids.scalar_type()))
    throw std::invalid_argument("prefix_ids and suffix_ids must hold integer token ids");
  for (const auto& [name, ids] : {std::pair{"prefix_ids", &x.prefix_ids}, std::pair{"suffix_ids", &x.suffix_ids}})
    if (ids->numel() && ids->min().item<int64_t>() < 0)
      throw std::invalid_argument(std::string(name) + " holds a negative token id, " +
                                  std::to_string(ids->min().item<int64_t>()));
  for (const auto& [name, t] : {std::pair{"pixel_values", &x.pixel_values}, std::pair{"image", &x.image},
                                std::pair{"null_text_embeds", &x.null_text_embeds}})
    check_finite_input(*t, name);
  const int64_t b = manifest_.graph("llava").spec.check({x.pixel_values, x.prefix_ids, x.suffix_ids}).at("B");
  const GraphSpec& encoder = manifest_.graph("vae_encoder").spec;
  const auto image_dims = encoder.check({x.image});
  if (image_dims.at("B") != b)
    throw std::invalid_argument("image holds " + std::to_string(x.image.size(0)) + " images, pixel_values " +
                                std::to_string(b) + ": one batch");
  // the latents must also fit the unet graph (its sample's h and w are multiples of k): refuse now, in image pixels,
  // rather than after the encoder ran, in the compiled graph's words
  const GraphSpec& unet = manifest_.graph("unet").spec;
  if (!unet.inputs.empty() && unet.inputs[0].shape.size() == 4 && encoder.inputs.at(0).shape.size() == 4) {
    for (int axis : {2, 3}) {
      const auto& [k, dim] = unet.inputs[0].shape[axis];
      const int64_t px_per_latent = encoder.inputs[0].shape[axis].first;
      const int64_t latent = x.image.size(axis) / px_per_latent;
      const char* side = axis == 2 ? "height" : "width";
      if (!dim.empty() && k > 1 && latent % k)
        throw std::invalid_argument("image " + std::string(side) + " " + std::to_string(x.image.size(axis)) +
                                    " px is not a multiple of " + std::to_string(k * px_per_latent) +
                                    " px, which the unet graph needs");
    }
  }
  check_deepcache(manifest_, o.deepcache);  // the interval, and the export's DeepCache graphs for one above 1
  if (o.deepcache > 1) {  // the first DeepCache edit loads the pair (hashed against the manifest first)
    const std::lock_guard<std::mutex> lock(deepcache_load_);
    if (!denoiser_->has_deepcache())
      denoiser_->load_deepcache(manifest_.open("unet_deep").file, manifest_.open("unet_shallow").file);
  }
  auto clock = std::chrono::steady_clock::now();
  const auto lap = [&](const char* phase, const at::Tensor& done) {
    if (!phase_ms) return;
    if (device_.is_cuda()) done.cpu();  // synchronise before reading the clock
    const auto now = std::chrono::steady_clock::now();
    (*phase_ms)[phase] = std::chrono::duration<double, std::milli>(now - clock).count();
    clock = now;
  };
  const auto llava = call("llava", {x.pixel_values, x.prefix_ids, x.suffix_ids});  // img_hidden, clip_feats
  const auto cond = call("qformer_bim", {llava[0], llava[1]});                      // prompt_embeds, bim_residual
  lap("condition", cond[0]);
  const at::Tensor latents = call("vae_encoder", {x.image})[0];                     // [B,4,H/8,W/8]
  lap("vae_encode", latents);
  DenoiseOptions with_sampler = o;  // no sampler asked for: the one the export recorded
  if (with_sampler.sampler.empty()) with_sampler.sampler = manifest_.sampler();
  if (!with_sampler.scheduler) with_sampler.scheduler = manifest_.scheduler_config(with_sampler.sampler);
  const at::Tensor denoised = denoiser_->run({latents, cond[0], x.null_text_embeds, cond[1]}, with_sampler);  // casts
  lap("denoise", denoised);
  const at::Tensor image = call("vae_decoder", {denoised})[0];                      // [B,3,H,W]
  lap("vae_decode", image);
  return image;
}

}  // namespace smartedit
