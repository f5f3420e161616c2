// plan_job: plan a batch job's prefix sharing from token-id files with the batchllm C++ library.
//
//   plan_job [--block-size N] [--max-depth D] FILE...
//
// Each non-empty line of each FILE is one prompt: token ids (>= 0) separated by whitespace. The
// program builds the radix tree over every prompt (batchllm::PrefixTree), asks for the multi-level
// sharing plan and prints it in a line-oriented form that scripts can read:
//
//   requests R prompt_tokens P prefill_tokens F shared_tokens S groups G nodes N
//   prefix I parent J depth D tokens B E requests r0 r1 ...
//   request K prefix I            (deepest shared prefix of request K, -1 when it shares nothing)
#include <batchllm/prefix_tree.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Job {
  std::vector<int32_t> tokens;   // every prompt, back to back
  std::vector<int64_t> offsets{0};  // prompt i is tokens[offsets[i], offsets[i+1])
};

// Appends the prompts of one file; returns false (after printing why) on a bad token or file.
bool read_prompts(const std::string& path, Job& job) {
  std::ifstream in(path);
  if (!in) {
    std::cerr << "plan_job: cannot read " << path << "\n";
    return false;
  }
  std::string line;
  for (int line_no = 1; std::getline(in, line); ++line_no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::istringstream fields(line);
    std::string field;
    while (fields >> field) {
      char* end = nullptr;
      const long long id = std::strtoll(field.c_str(), &end, 10);
      if (*end != '\0' || id < 0 || id > INT32_MAX) {
        std::cerr << "plan_job: " << path << ":" << line_no << ": not a token id: " << field << "\n";
        return false;
      }
      job.tokens.push_back(static_cast<int32_t>(id));
    }
    job.offsets.push_back(static_cast<int64_t>(job.tokens.size()));
  }
  return true;
}

bool parse_positive(const char* text, int& value) {
  char* end = nullptr;
  const long parsed = std::strtol(text, &end, 10);
  if (*end != '\0' || parsed < 1 || parsed > 1 << 20) return false;
  value = static_cast<int>(parsed);
  return true;
}

int usage() {
  std::cerr << "usage: plan_job [--block-size N] [--max-depth D] FILE...\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  int block_size = 16;
  int max_depth = 8;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--block-size" || arg == "--max-depth") {
      if (i + 1 >= argc || !parse_positive(argv[++i], arg == "--block-size" ? block_size : max_depth)) return usage();
    } else if (!arg.empty() && arg[0] == '-') {
      return usage();
    } else {
      files.push_back(arg);
    }
  }
  if (files.empty()) return usage();

  Job job;
  for (const auto& path : files) {
    if (!read_prompts(path, job)) return 1;
  }
  const int64_t num_prompts = static_cast<int64_t>(job.offsets.size()) - 1;

  batchllm::PrefixTree tree;
  tree.insert(job.tokens.data(), job.offsets.data(), num_prompts);
  // Prefixes shorter than one block save nothing worth a group.
  const batchllm::SharingPlan plan = tree.group_multi_level(block_size, max_depth, block_size);
  const batchllm::PrefixTreeStats stats = tree.stats(plan);

  std::cout << "requests " << stats.requests << " prompt_tokens " << stats.prompt_tokens
            << " prefill_tokens " << stats.prefill_tokens << " shared_tokens " << stats.shared_tokens
            << " groups " << stats.groups << " nodes " << stats.nodes << "\n";
  for (size_t p = 0; p < plan.prefixes.size(); ++p) {
    const batchllm::SharedPrefix& prefix = plan.prefixes[p];
    std::cout << "prefix " << p << " parent " << prefix.parent << " depth " << prefix.depth << " tokens "
              << prefix.begin << " " << prefix.end << " requests";
    for (int64_t r : prefix.requests) std::cout << " " << r;
    std::cout << "\n";
  }
  for (int64_t r = 0; r < num_prompts; ++r) {
    std::cout << "request " << r << " prefix " << plan.request_prefix[r] << "\n";
  }
  return 0;
}
