"""The fine-tune's numbers, in a module without torch: the corrections widget shows them when
its dock opens, before the background import has loaded torch (docs/widgets.md)."""

#: Ordinary training patches drawn per corrected image (replay against forgetting).
REPLAY_PER_IMAGE = 2
#: Epochs of a fine-tune (over the corrected images and their replay sample).
FINETUNE_EPOCHS = 10
#: The fine-tune's learning rate relative to the run's: the run's own lr, restarted on a
#: trained model with the painted pixels' large loss, undoes what training learnt; on the
#: recommended recipe a tenth of it still lost up to 21 held-out mIoU points, three
#: hundredths never more than 1.8 (docs/results.md, "Correction loop").
FINETUNE_LR_SCALE = 0.03
