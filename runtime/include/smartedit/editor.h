// A whole SmartEdit edit from the AOTInductor packages of `smartedit-export --target aoti` (OUT/aoti/*.pt2),
// tensors in and out: the server keeps its own tokenizer and image codec, and hands over what
// SmartEditPipeline.runtime_inputs() produces (CLIP pixels, the padded prompt ids, the VAE image, the null-text
// embedding). Stages: llava -> qformer_bim -> vae_encoder -> the denoising loop (Denoiser) -> vae_decoder.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
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

class Editor {
 public:
  // `artifacts`: an smartedit-export folder whose manifest lists the aoti packages of the five graphs (llava,
  // qformer_bim, unet, vae_encoder, vae_decoder); their files and input specs come from the manifest
  Editor(const std::string& artifacts, const c10::Device& device);

  // -> image [B,3,H,W] in [-1, 1]. Inputs may have any dtype (ids any integer type): each package casts them to
  // its own. `stage_ms`, if given, receives wall times per stage (device-synchronised). options.sampler empty: the
  // sampler the manifest records (sampler()).
  at::Tensor run(const EditInputs& inputs, const DenoiseOptions& options,
                 std::map<std::string, double>* stage_ms = nullptr);
  const std::string& sampler() const { return manifest_.sampler(); }

 private:
  std::vector<at::Tensor> call(const std::string& graph, const std::vector<at::Tensor>& inputs);

  Manifest manifest_;
  std::map<std::string, std::unique_ptr<Package>> graphs_;
  std::unique_ptr<Denoiser> denoiser_;
  c10::Device device_;
};

}  // namespace smartedit
