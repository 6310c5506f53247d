import ArgumentParser

/// Subcommands whose implementation has not landed yet say so plainly and exit 2.
enum NotAvailable {
    static func fail(_ command: String) -> ExitCode {
        Output.err("keyhole \(command): not available yet in this build (\(Keyhole.version)); see README.md for what works today")
        return ExitCode(2)
    }
}

struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a guest behind Keyhole from a policy file. (Not available yet.)")

    @Argument(help: "Policy file.") var file: String
    @Argument(parsing: .postTerminator, help: "Command to run in the guest.") var command: [String] = []

    func run() throws { throw NotAvailable.fail("run") }
}
