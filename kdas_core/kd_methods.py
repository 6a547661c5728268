"""The --kd methods by name with their one-line summaries, without importing torch (the training
CLIs' --help lists them at once). Each method class in `kdas_core.losses.methods` takes its
`summary` from here when it registers."""

KD_METHODS: dict[str, str] = {
    'none': 'no distillation: the student learns from the masks alone',
    'at': 'attention transfer: MSE of L2-normalised channel-mean |F|^2 maps, 4 encoder stages (beta=1000)',
    'cwd': 'channel-wise KD: KL of per-channel spatial softmax (tau=4) on P1/P2 logits and CFM/SAM features (1x1 adapters)',
    'grd': 'graph relation KD: SAM affinities at offsets 1/3/5/9/27 (x10) + instance graph of mask components (nodes, edges x0.1) + 32-node cross-image bank',
    'hlfd': 'HLFD: stage 1 <- combined middle stages, stages 2-3 <- deepest (attention p=4); decoder maps <- combined decoder maps / output (KL tau=4)',
    'kd': 'Hinton KD per pixel: tau^2 * two-class KL(sigmoid(zT/tau) || sigmoid(zS/tau)) on P1 and P2, tau=4',
    'kdas': 'KDAS, scale-free: SGM on probabilities (P1+P2) + attention KL on standardised logits; (1-a)*seg + a*w*KD, a=0.3, tau=2, w=0.5 (chosen on validation; kdas:1 = paper weights)',
    'kdas-paper': 'KDAS as published: raw-logit SGM on P1 only + attention KL on P1/P2; (1-a)*seg + a*KD, a=0.3, tau=2',
    'mtkd': 'multi-teacher KD (repeat --teacher, train --subset k/K): Dice+Lovasz replace seg loss, KL to Dice-weighted ensemble (tau=4), standardised feature MSE',
    'skd': 'structured KD, pair-wise: MSE of cosine-similarity matrices of pooled nodes (<=16x16), last stage and SAM',
}
