//! `heterotune-trainer`: train / aggregate / eval subcommands (in progress).

fn main() {
    eprintln!("heterotune-trainer: the train/aggregate/eval subcommands are not implemented yet");
    std::process::exit(2);
}
