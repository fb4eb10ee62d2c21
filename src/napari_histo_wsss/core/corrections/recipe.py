"""The fine-tune's numbers, in a module without torch: the corrections widget shows them when
its dock opens, before the background import has loaded torch (docs/widgets.md)."""

#: Ordinary training patches drawn per corrected image (replay against forgetting).
REPLAY_PER_IMAGE = 2
#: Epochs of a fine-tune (over the corrected images and their replay sample).
FINETUNE_EPOCHS = 10
#: The fine-tune's learning rate relative to the run's: the run's own lr, restarted on a
#: trained model with the painted pixels' large loss, undoes what training learnt.
FINETUNE_LR_SCALE = 0.1
