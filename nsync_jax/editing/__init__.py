"""Zero-shot image editing: pix2pix-zeroCon (arXiv 2503.20484), its predecessor pix2pix-zero (arXiv 2302.03027)
and SDEdit as the usual baseline.

- `inversion`: DDIM inversion (`invert`, with `schedulers.DDIMInverseSampler`) with pix2pix-zero's noise regularisation;
- `directions`: editing directions from sentence banks or templates (cached), token masks of words;
- `losses`: the cross-attention loss L_xa and the patch-wise contrastive loss L_cut (PatchNCE);
- `zerocon`: the UNet with recorded attention, the reference and edit passes, SDEdit, as pure functions;
- `editor`: batched, compiled editing of arrays (`edit_images`) and of files (`edit_files`, the `edit` command).
"""
