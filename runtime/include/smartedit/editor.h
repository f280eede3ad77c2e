// A whole SmartEdit edit from the AOTInductor packages of `smartedit-export --target aoti` (OUT/aoti/*.pt2),
// tensors in and out: the server keeps its own tokenizer and image codec, and hands over what
// SmartEditPipeline.runtime_inputs() produces (CLIP pixels, the padded prompt ids, the VAE image, the null-text
// embedding). Stages: llava -> qformer_bim -> vae_encoder -> the denoising loop (Denoiser) -> vae_decoder.
// DeepCache (options.deepcache = N > 1, see denoiser.h): the first such edit loads the export's unet_deep and
// unet_shallow packages (their manifest entries, sha256 checked first) and keeps them for the edits after it.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "smartedit/denoiser.h"
#include "smartedit/manifest.h"
#include "smartedit/package.h"

namespace smartedit {

struct EditInputs {
  at::Tensor pixel_values;      // [B,3,224,224] CLIP-normalised image
  at::Tensor prefix_ids;        // [B,Lp] int64, left-padded with 0 (<unk>)
  at::Tensor suffix_ids;        // [B,Ls] int64, the forced answer with the 32 <img_i> tokens, right-aligned
  at::Tensor image;             // [B,3,H,W] VAE input in [-1, 1]
  at::Tensor null_text_embeds;  // [1,77,D]
};

// The skip branch of the DeepCache graphs of `manifest` (their entries' options.cache_branch) for an edit with
// DeepCache interval `interval`; -1 for interval 1 (the plain loop, no DeepCache graph needed). std::invalid_argument
// naming the reason: an interval outside [1, 1000]; above 1, an export without the pair (unet_deep, unet_shallow) or
// whose two entries do not record one branch.
int64_t check_deepcache(const Manifest& manifest, int64_t interval);

class Editor {
 public:
  // `artifacts`: an smartedit-export folder whose manifest lists the aoti packages of the five graphs (llava,
  // qformer_bim, unet, vae_encoder, vae_decoder); their files and input specs come from the manifest
  Editor(const std::string& artifacts, const c10::Device& device);

  // -> image [B,3,H,W] in [-1, 1]. Inputs may have any dtype (ids any integer type): each package casts them to
  // its own. `phase_ms`, if given, receives wall times per phase (device-synchronised). options.sampler empty: the
  // sampler the manifest records (sampler()). options.deepcache > 1: refused (std::invalid_argument, before any
  // work) by check_deepcache when the export has no DeepCache graphs.
  at::Tensor run(const EditInputs& inputs, const DenoiseOptions& options,
                 std::map<std::string, double>* phase_ms = nullptr);
  const std::string& sampler() const { return manifest_.sampler(); }
  // The skip branch the export's DeepCache graphs were made at; -1 when it has none.
  int64_t cache_branch() const;

 private:
  std::vector<at::Tensor> call(const std::string& graph, const std::vector<at::Tensor>& inputs);

  Manifest manifest_;
  std::map<std::string, std::unique_ptr<Package>> graphs_;
  std::unique_ptr<Denoiser> denoiser_;
  std::mutex deepcache_load_;  // the first DeepCache edit loads the pair into denoiser_
  c10::Device device_;
};

}  // namespace smartedit
