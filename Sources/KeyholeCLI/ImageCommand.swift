import ArgumentParser
import KeyholeLauncher

struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image",
        abstract: "Manage the builtin guest image.",
        subcommands: [Build.self])

    struct Build: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Assemble the builtin guest image now (keyhole run does it on first use).",
            discussion: """
                Downloads a Debian cloud kernel, busybox, curl, python3 and the CA bundle with \
                apt-get and writes an initramfs into the state directory. Run it where Debian's \
                package servers are reachable, for example before keyhole run inside a network \
                namespace without them. Exit 0 built or already cached, 1 failed.
                """)

        @OptionGroup var state: StateOptions

        @Flag(help: "Build again even if the cache has the image.") var rebuild = false

        func run() throws {
            let image = BuiltinImage(stateDirectory: state.resolved)
            if rebuild { image.discard() }
            if image.isReady {
                Output.err("keyhole image: the builtin image is cached in \(image.directory)")
                return
            }
            do {
                try image.ensure(progress: { Output.err("keyhole image: " + $0) })
            } catch {
                Output.err("keyhole image: \(error)")
                throw ExitCode(1)
            }
        }
    }
}
