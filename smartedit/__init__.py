"""SmartEdit: instruction-based image editing (LLaVA + QFormer + BIM + InstructPix2Pix UNet), PyTorch reference."""
