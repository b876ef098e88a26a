"""The one exception type a user sees."""


class DreamLoomError(Exception):
    """An error the user can act on: `message` says what is wrong, `hint` how to fix it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\nFix: {self.hint}" if self.hint else self.message


# What to try when a run does not fit in GPU memory, in order of what it saves (measured: README "Memory").
OUT_OF_MEMORY_HINT = (
    "In order of what they save: mixed_precision fp16 or bf16 (auto does), gradient_checkpointing on (SD1.5 512 px "
    "LoRA: 3.9 -> 3.1 GiB), a lower resolution or batch size, closing other GPU programs. 8-bit AdamW saves almost "
    "nothing for a LoRA (its optimizer state is a few MB), but 6 bytes per weight for a full fine-tune (SD1.5: "
    "5.2 GB): turn use_8bit_adam on there."
)


class StopRequested(Exception):
    """Raised inside the training loop when a stop was requested; a checkpoint has been written."""

    def __init__(self, step: int, checkpoint: str | None, announced: bool = False):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.announced = announced  # the "stopped" event is already written


# ComfyUI loads the pack by path, so the module would read as a full folder path in its error panel
# ("/home/.../custom_nodes/DreamLoom.trainer.errors.DreamLoomError"); the panel shows this name instead.
DreamLoomError.__module__ = StopRequested.__module__ = "DreamLoom"
