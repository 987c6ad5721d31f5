"""Reference models: classifiers, CIFAR ResNets, a tiny GPT, local Hugging Face loading."""
