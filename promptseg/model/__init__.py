"""Network definition: blocks, prompt fusion, U-Net, text encoder."""
