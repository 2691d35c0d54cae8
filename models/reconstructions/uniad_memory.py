"""DuMeNet (UniADMemory): UniAD whose decoder queries come from a channel and a spatial memory.

The encoder output is read through a channel memory (token -> slot attention) and/or an
SSIM-based spatial memory (channel map -> slot-map attention); the fused read-out replaces
UniAD's learned decoder query, so the decoder rebuilds features from memorised normal patterns
and an anomaly cannot be copied through (the "identical shortcut"). Everything else (jitter,
projections, positions, transformer, anomaly map) is UniAD's code, reused.
"""
import torch

from dualmem.models.initializer import initialize_from_cfg
from dualmem.models.reconstructions.memory import (FUSION_MODES, ChannelMemory, SpatialMemory,
                                           _check_choice, build_fusion)
from dualmem.models.reconstructions.transformer import Transformer
from dualmem.models.reconstructions.uniad import FeatureReconstruction
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError

MEMORY_MODES = ("channel", "spatial", "both", "none")


@MODELS.register(aliases=("DuMeNet",), path="models.reconstructions")
class UniADMemory(FeatureReconstruction):
    """UniAD's kwargs plus DuMeNet's.

    memory_mode: channel | spatial | both | none (none = plain UniAD, learned queries).
    fusion_mode: concat | add | multiply | attention | gate; used only with ``both``.
    continuous_query: the read-out is the query of every decoder layer (true) or only the
        first, later layers using their learned queries (false, the reference code).
    ssim_mode / ssim_window / ssim_sigma / ssim_data_range / spatial_temperature /
        learn_temperature: see :class:`SpatialMemory`.
    sigmoid_output: squash feature_rec and feature_align (and so the loss and the anomaly
        map) through a sigmoid, as the reference does; off by default.
    """

    def __init__(self, inplanes, instrides, feature_size, hidden_dim=256, pos_embed_type="learned",
                 nhead=8, num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=1024,
                 dropout=0.1, activation="relu", normalize_before=False,
                 feature_jitter=None, neighbor_mask=None, initializer=None, save_recon=None,
                 memory_mode="both", fusion_mode="concat", channel_memory_size=256,
                 spatial_memory_size=256, ssim_mode="local", ssim_window=11, ssim_sigma=1.5,
                 ssim_data_range=4.0, spatial_temperature=0.1, learn_temperature=True,
                 continuous_query=True, sigmoid_output=False):
        _check_choice("memory_mode", memory_mode, MEMORY_MODES)
        _check_choice("fusion_mode", fusion_mode, FUSION_MODES)
        super().__init__(inplanes, instrides, feature_size, hidden_dim, pos_embed_type,
                         feature_jitter)
        if save_recon:
            raise UserError("save_recon is not supported; use tools/predict.py for outputs")
        self.transformer = Transformer(hidden_dim, feature_size, neighbor_mask, nhead,
                                       num_encoder_layers, num_decoder_layers, dim_feedforward,
                                       dropout, activation, normalize_before)
        self.memory_mode, self.fusion_mode = memory_mode, fusion_mode
        self.continuous_query = bool(continuous_query)
        self.sigmoid_output = bool(sigmoid_output)
        # unused memories are not built: no dead parameters in the optimizer or checkpoints
        self.channel_memory = ChannelMemory(hidden_dim, channel_memory_size) \
            if memory_mode in ("channel", "both") else None
        self.spatial_memory = SpatialMemory(
            feature_size, spatial_memory_size, ssim_mode, ssim_window, ssim_sigma,
            ssim_data_range, spatial_temperature, learn_temperature) \
            if memory_mode in ("spatial", "both") else None
        self.fusion = build_fusion(fusion_mode, hidden_dim) if memory_mode == "both" else None
        initialize_from_cfg(self, initializer)
        if memory_mode != "none":
            # learned queries the read-out replaces stay (UniAD checkpoints still load) but are
            # frozen: nothing dead in the optimizer, and DDP needs no find_unused_parameters
            layers = self.transformer.decoder_layers
            for layer in (layers if self.continuous_query else layers[:1]):
                layer.learned_embed.weight.requires_grad_(False)

    def read_memories(self, encoded):
        """Encoder tokens (B, L, d) -> (decoder query (B, L, d) or None, attention weights)."""
        attention = {}
        channel = spatial = None
        if self.channel_memory is not None:
            channel, attention["channel"] = self.channel_memory(encoded)
        if self.spatial_memory is not None:
            b, _, d = encoded.shape
            maps = encoded.transpose(1, 2).reshape(b, d, *self.feature_size)
            spatial, attention["spatial"] = self.spatial_memory(maps)
            spatial = spatial.flatten(2).transpose(1, 2)
        if self.fusion is not None:
            return self.fusion(channel, spatial, encoded), attention
        return (channel if channel is not None else spatial), attention

    def forward(self, input):
        feature_align = input["feature_align"]
        pos = self.pos_embed()
        encoded = self.transformer.encode(self.tokens_in(feature_align), pos)
        query, _ = self.read_memories(encoded)
        decoded = self.transformer.decode(encoded, pos, query=query,
                                          continuous_query=self.continuous_query)
        return self.outputs(decoded, feature_align)

    def compare(self, feature_rec, feature_align):
        if self.sigmoid_output:
            feature_rec, feature_align = torch.sigmoid(feature_rec), torch.sigmoid(feature_align)
        return super().compare(feature_rec, feature_align)
