;;; rlm.el --- Ask a Recursive Language Model daemon about large texts  -*- lexical-binding: t; -*-

;; Copyright (C) 2026 The rlmd authors

;; Author: The rlmd authors
;; Maintainer: The rlmd authors
;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1"))
;; Keywords: tools, convenience, text
;; URL: https://github.com/rlmd/rlmd

;; This file is not part of GNU Emacs.

;; This program is free software; you can redistribute it and/or modify
;; it under the terms of the GNU General Public License as published by
;; the Free Software Foundation, either version 3 of the License, or
;; (at your option) any later version.

;; This program is distributed in the hope that it will be useful,
;; but WITHOUT ANY WARRANTY; without even the implied warranty of
;; MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
;; GNU General Public License for more details.

;; You should have received a copy of the GNU General Public License
;; along with this program.  If not, see <https://www.gnu.org/licenses/>.

;;; Commentary:

;; A front end for rlmd, a daemon that answers questions about texts far
;; larger than a model's context window: a root model writes Python code
;; that probes the text, and calls sub-models on pieces of it (Recursive
;; Language Models).  Emacs talks JSON-RPC to the daemon over its Unix
;; socket with the built-in jsonrpc.el (see rlm-client.el).
;;
;; Commands:
;;
;;   `rlm-query'          ask about the region, the Org subtree or the buffer
;;   `rlm-query-insert'   the same, the answer inserted at point
;;   `rlm-query-buffer'   ask about the whole buffer
;;   `rlm-query-region'   ask about the region
;;   `rlm-query-subtree'  ask about the current Org subtree
;;   `rlm-query-files'    ask about files or a directory (read by the daemon)
;;   `rlm-query-context'  ask about a context the daemon already holds
;;   `rlm-add'            add the region, buffer or file to the next query
;;   `rlm-menu'           a transient menu of every setting
;;   `rlm-review-diff'    review the diff in a `diff-mode' buffer
;;   `rlm-contexts'       list, peek at, search and drop the daemon's contexts
;;   `rlm-cancel'         cancel a running query (also from its source buffer)
;;   `rlm-status'         show the daemon and its pool of model servers
;;   `rlm-trace'          show the trajectory of a query
;;   `rlm-daemon-log'     show the log of the daemon Emacs started
;;   `rlm-repl'           a Python REPL bound to a context
;;   `rlm-improve'        the improvement cycle, with a review buffer
;;
;; Each conversation gets its own result buffer; follow-up questions
;; (\\<rlm-result-mode-map>\\[rlm-follow-up]) append to it.  The model's
;; work streams into a folded trajectory section while the header line
;; shows what is going on; the answer is inserted above it when it
;; arrives.  Point never moves and C-c C-k stops the query.
;;
;; See docs/emacs.md in the rlmd repository for the whole manual.

;;; Code:

(require 'cl-lib)
(require 'subr-x)
(require 'button)
(require 'rlm-client)
(require 'rlm-contexts)
(require 'rlm-views)

(declare-function org-back-to-heading "org" (&optional invisible-ok))
(declare-function org-end-of-subtree "org" (&optional invisible-ok to-heading))
(declare-function org-before-first-heading-p "org" ())
(declare-function org-get-heading "org" (&optional no-tags no-todo no-priority no-comment))
(declare-function org-entry-get "org" (pom property &optional inherit literal-nil))
(declare-function org-get-outline-path "org" (&optional with-self use-cache))
(declare-function dired-get-marked-files "dired"
                  (&optional localp arg filter distinguish-one-marked error))
(declare-function project-root "project" (project))

;;;; Settings (every one may be buffer-local)

(defcustom rlm-query-options nil
  "Default options of every query, a plist of the daemon's option names.
For example (:max_iterations 20 :max_depth 1 :timeout_s 600).
The settings below, a preset and per-call options override these."
  :type '(plist :key-type symbol :value-type sexp)
  :group 'rlm)

(defcustom rlm-root-model nil
  "Root model of queries (option root_model); nil: the daemon's."
  :type '(choice (const :tag "The daemon's" nil) string)
  :group 'rlm)

(defcustom rlm-sub-model nil
  "Sub-model of queries (option sub_model); nil: the daemon's."
  :type '(choice (const :tag "The daemon's" nil) string)
  :group 'rlm)

(defcustom rlm-mode nil
  "How the daemon answers (option mode): nil picks by size."
  :type '(choice (const :tag "The daemon picks" nil)
                 (const "rlm") (const "rlm-nosub") (const "base"))
  :group 'rlm)

(defcustom rlm-max-iterations nil
  "At most this many root turns (option max_iterations); nil: the daemon's."
  :type '(choice (const nil) integer)
  :group 'rlm)

(defcustom rlm-max-cost nil
  "At most this cost in dollars (option max_cost); nil: the daemon's."
  :type '(choice (const nil) number)
  :group 'rlm)

(defcustom rlm-timeout nil
  "At most this many seconds (option timeout_s); nil: the daemon's."
  :type '(choice (const nil) number)
  :group 'rlm)

(defcustom rlm-use-cache t
  "Non-nil means the daemon may answer from its cache (option cache)."
  :type 'boolean
  :group 'rlm)

(defcustom rlm-preset nil
  "Name (a symbol) of the preset of `rlm-define-preset' in use, or nil.
An Org entry's RLM_PRESET property overrides it there."
  :type '(choice (const nil) symbol)
  :group 'rlm)

(defcustom rlm-show-trajectory-while-running t
  "Non-nil means the trajectory is expanded while the query runs.
It is folded when the answer arrives, unless you toggled it meanwhile."
  :type 'boolean
  :group 'rlm)

(defcustom rlm-review-question
  "Review this diff as a careful senior engineer.  List bugs, risky \
changes, unclear code and missing tests, most important first.  Cite \
every finding as path:line, using the new file's line numbers from the \
hunk headers.  Be concise."
  "Question asked by `rlm-review-diff' and `rlm-magit-review'."
  :type 'string
  :group 'rlm)

(defcustom rlm-query-finished-functions nil
  "Functions called when a query ends with an answer.
Each is called with two arguments: the answer (a string) and the
result buffer."
  :type 'hook
  :group 'rlm)

(defface rlm-root-text '((t :inherit shadow))
  "Face of the root model's streamed output in the trajectory."
  :group 'rlm)

(defface rlm-code '((t :inherit font-lock-constant-face))
  "Face of code blocks run in the trajectory."
  :group 'rlm)

(defface rlm-output '((t :inherit font-lock-string-face))
  "Face of code output in the trajectory."
  :group 'rlm)

(defface rlm-subcall '((t :inherit font-lock-function-name-face))
  "Face of sub-call lines in the trajectory."
  :group 'rlm)

(defface rlm-added '((t :inherit highlight :extend t))
  "Face of regions added with `rlm-add'."
  :group 'rlm)

(defface rlm-flags '((t :inherit warning :weight bold))
  "Face of the marks cached, best effort and unsupported."
  :group 'rlm)

(defvar rlm-question-history nil
  "Minibuffer history of questions.")

(defvar rlm--presets nil
  "Presets: alist of name (a symbol) to a plist of daemon options.")

;;;###autoload
(defun rlm-define-preset (name &rest options)
  "Define the preset NAME (a symbol) as OPTIONS, daemon option names.
For example (rlm-define-preset \\='deep :root_model \"big\"
:max_iterations 30).  Use it with `rlm-preset' (buffer-local too),
the Org property RLM_PRESET, or `rlm-menu'."
  (setf (alist-get name rlm--presets) options)
  name)

(defun rlm--org-property (property)
  "Return the Org PROPERTY at point (inherited), or nil outside Org."
  (when (derived-mode-p 'org-mode)
    (require 'org)
    (let ((v (ignore-errors (org-entry-get nil property t))))
      (and (stringp v) (not (string-empty-p v)) v))))

(defun rlm--preset-options (name)
  "Return the options of preset NAME (a symbol or string)."
  (when name
    (let ((sym (if (stringp name) (intern name) name)))
      (or (alist-get sym rlm--presets)
          (user-error "No rlm preset named %s (define it with `rlm-define-preset')" sym)))))

(defun rlm-effective-options (&optional options)
  "Return the daemon options of a query from here, OPTIONS last.
In order, later winning: `rlm-query-options', the settings
variables (`rlm-root-model' ...), the preset (`rlm-preset' or the
Org property RLM_PRESET), the Org property RLM_MODEL, OPTIONS."
  (rlm--merge-plists
   rlm-query-options
   (rlm--plist :root_model rlm-root-model :sub_model rlm-sub-model
               :mode rlm-mode :max_iterations rlm-max-iterations
               :max_cost rlm-max-cost :timeout_s rlm-timeout
               :cache (and (not rlm-use-cache) :json-false))
   (rlm--preset-options (or (rlm--org-property "RLM_PRESET") rlm-preset))
   (rlm--plist :root_model (rlm--org-property "RLM_MODEL"))
   options))

;;;; Result buffer

(defvar rlm-result-mode-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "C-c C-k") #'rlm-cancel)
    (define-key map (kbd "C-g") #'rlm-cancel-or-quit)
    (define-key map (kbd "C-c C-c") #'rlm-follow-up)
    (define-key map (kbd "r") #'rlm-follow-up)
    (define-key map (kbd "g") #'rlm-regenerate)
    (define-key map (kbd "TAB") #'rlm-toggle-trajectory)
    (define-key map (kbd "t") #'rlm-trace)
    (define-key map (kbd "w") #'rlm-copy-answer)
    (define-key map (kbd "n") #'forward-button)
    (define-key map (kbd "p") #'backward-button)
    map)
  "Keymap of `rlm-result-mode'.")

(defvar-local rlm--buffer-jobs nil
  "The jobs this result buffer shows, oldest first.")

(define-derived-mode rlm-result-mode special-mode "rlm"
  "Major mode of rlm result buffers.
Each question of the conversation has its section: the question,
the answer, its sources (buttons into the text), the trajectory
\(code, output and sub-calls) folded below it.

\\{rlm-result-mode-map}"
  (setq-local header-line-format '(:eval (rlm--header-line)))
  (setq-local revert-buffer-function #'rlm--revert-regenerates)
  (setq-local truncate-lines nil)
  (add-hook 'kill-buffer-hook #'rlm--cancel-on-kill nil t)
  (visual-line-mode 1))

(cl-defstruct (rlm-view (:constructor rlm--view-create) (:copier nil))
  "What a result buffer shows of one job: markers and folding state."
  buffer section answer-marker traj-end overlay button change-group
  (turn 0) (turn-text "") (code-in-text nil) (toggled nil) last-kind)

(defun rlm--state-text (job)
  "Return a short description of JOB's state."
  (pcase (rlm-job-state job)
    ('connecting "connecting")
    ('thinking (or (rlm--phase-text (rlm-job-phase job)) "thinking"))
    ('running-code "running code")
    ('sub-calls "waiting for sub-calls")
    ('cancelling "cancelling")
    ('done "done")
    ('cancelled "cancelled")
    ('error "failed")
    (s (format "%s" s))))

(defun rlm--phase-text (phase)
  "Return the text of PHASE, a plist from a phase event, or nil."
  (when phase
    (let ((name (plist-get phase :phase))
          (tokens (plist-get phase :tokens)))
      (pcase name
        ("loading_model" (if-let* ((m (plist-get phase :model)))
                             (format "loading the model %s" m)
                           "loading the model"))
        ("prompt" (if (numberp tokens)
                      (format "reading the prompt: %s tokens" (rlm--format-count tokens))
                    "reading the prompt"))
        ("searching" "searching the context")
        ((pred stringp) (replace-regexp-in-string "_" " " name))
        (_ nil)))))

(defun rlm--flags (job)
  "Return the flags of JOB's answer: a list of strings."
  (delq nil (list (and (rlm-job-cached-p job) "cached")
                  (and (rlm-job-best-effort-p job) "best effort")
                  (and (rlm-job-unsupported-p job) "unsupported"))))

(defun rlm--header-line ()
  "Return the header line of a result buffer."
  (let* ((job rlm--job)
         (view (and job (rlm-job-view job))))
    (if (not job) "rlm"
      (let ((tokens (rlm--tokens-total (rlm-job-tokens job)))
            (cost (rlm-job-cost job))
            (turn (max (rlm-job-iteration job) (if view (rlm-view-turn view) 0)))
            (flags (rlm--flags job)))
        (concat
         (propertize (format " rlm: %s" (rlm--state-text job))
                     'face (pcase (rlm-job-state job)
                             ('error 'rlm-error)
                             ((or 'done 'cancelled) 'success)
                             (_ 'warning)))
         (mapconcat (lambda (f) (concat " · " (propertize f 'face 'rlm-flags))) flags "")
         (format " · %s" (or (rlm-job-model job) "default model"))
         (if (> turn 0) (format " · turn %d" turn) "")
         (format " · %d sub-call%s" (rlm-job-sub-calls job)
                 (if (= (rlm-job-sub-calls job) 1) "" "s"))
         (if tokens (format " · %s tokens" (rlm--format-count tokens)) "")
         (if (and (numberp cost) (> cost 0)) (format " · $%.4f" cost) "")
         (format " · %.1fs" (rlm-job-elapsed job))
         (cond ((rlm-job-running-p job)
                (substitute-command-keys "   \\<rlm-result-mode-map>\\[rlm-cancel] cancel"))
               ((rlm-job-cached-p job)
                (substitute-command-keys "   \\<rlm-result-mode-map>\\[rlm-regenerate] regenerate"))
               (t "")))))))

(defun rlm--result-buffer-name (question)
  "Return a name for the result buffer of QUESTION."
  (format "*rlm: %s*" (rlm--truncate question 50)))

(defmacro rlm--in-view (view &rest body)
  "Run BODY in VIEW's buffer, writable, keeping point and the unmodified flag."
  (declare (indent 1) (debug t))
  (let ((buf (make-symbol "buf")))
    `(let ((,buf (and ,view (rlm-view-buffer ,view))))
       (when (buffer-live-p ,buf)
         (with-current-buffer ,buf
           (let ((inhibit-read-only t))
             (prog1 (save-excursion ,@body)
               ;; A result buffer visits no file: never show it modified.
               (set-buffer-modified-p nil))))))))

(defun rlm--insert-section (job buffer)
  "Append JOB's section to BUFFER, a result buffer; return its view."
  (with-current-buffer buffer
    (let ((inhibit-read-only t)
          (view (rlm--view-create :buffer buffer)))
      (save-excursion
        (goto-char (point-max))
        (unless (bobp)
          (insert "\n" (propertize (make-string 40 ?─) 'face 'shadow) "\n"))
        (setf (rlm-view-section view) (point-marker))
        (insert (propertize (if (rlm-job-follow-up job) "Follow-up: " "Question: ")
                            'face 'rlm-label)
                (rlm-job-question job) "\n")
        (when (rlm-job-description job)
          (insert (propertize "Context: " 'face 'rlm-label)
                  (rlm-job-description job) "\n"))
        (insert "\n")
        (let ((answer-pos (point)))
          (insert "\n")
          ;; Created after the text that follows it, so that only answer
          ;; insertions push it forward.
          (setf (rlm-view-answer-marker view) (copy-marker answer-pos t)))
        (setf (rlm-view-button view)
              (copy-marker
               (insert-text-button (if rlm-show-trajectory-while-running
                                       "▾ Trajectory" "▸ Trajectory")
                                   'face 'rlm-heading
                                   'rlm-view view
                                   'action (lambda (b) (rlm--toggle-view (button-get b 'rlm-view)))
                                   'follow-link t
                                   'help-echo "Show or hide the model's work")))
        (insert "\n")
        (setf (rlm-view-traj-end view) (point-marker))
        (set-marker-insertion-type (rlm-view-traj-end view) t)
        (let ((ov (make-overlay (point) (point) nil nil t)))
          (overlay-put ov 'rlm-trajectory t)
          (overlay-put ov 'invisible (not rlm-show-trajectory-while-running))
          (setf (rlm-view-overlay view) ov)))
      (let ((group (prepare-change-group)))
        (activate-change-group group)
        (setf (rlm-view-change-group view) group))
      (set-buffer-modified-p nil)
      view)))

(defun rlm--setup-result-buffer (job &optional buffer)
  "Show JOB in BUFFER (a result buffer of the conversation) or a new one."
  (let ((buf (or buffer (generate-new-buffer
                         (rlm--result-buffer-name (rlm-job-question job))))))
    (with-current-buffer buf
      (unless (derived-mode-p 'rlm-result-mode)
        (rlm-result-mode)
        (setq buffer-undo-list nil)
        (goto-char (point-min)))
      (setq rlm--job job)
      (setq rlm--buffer-jobs (append rlm--buffer-jobs (list job))))
    (setf (rlm-job-view job) (rlm--insert-section job buf)
          (rlm-job-on-event job) #'rlm--view-event
          (rlm-job-on-finish job) #'rlm--view-finish)
    buf))

(defun rlm-job-buffer (job)
  "Return the result buffer showing JOB, or nil."
  (let ((view (rlm-job-view job)))
    (and view (rlm-view-buffer view))))

(defun rlm--cancel-on-kill ()
  "Cancel the query of this result buffer, which is being killed."
  (dolist (job rlm--buffer-jobs)
    (when (rlm-job-running-p job)
      (rlm-cancel-job job "its buffer was killed"))))

(defun rlm--trajectory-insert (view &rest strings)
  "Append STRINGS at the end of VIEW's trajectory."
  (rlm--in-view view
    (goto-char (rlm-view-traj-end view))
    (apply #'insert strings)
    (let ((ov (rlm-view-overlay view)))
      (when (overlay-buffer ov)
        (move-overlay ov (overlay-start ov) (rlm-view-traj-end view))))))

(defun rlm--indent (ev text)
  "Indent TEXT by the nesting depth of event EV (2 spaces a level)."
  (let ((depth (plist-get ev :depth)))
    (if (and (numberp depth) (> depth 1))
        (replace-regexp-in-string "^" (make-string (* 2 (1- depth)) ?\s) text)
      text)))

(defun rlm--trajectory-fresh-line (view)
  "Start a new line in VIEW's trajectory unless at the start of one."
  (let ((m (rlm-view-traj-end view)))
    (when (and (buffer-live-p (marker-buffer m))
               (with-current-buffer (marker-buffer m)
                 (not (memq (char-before m) '(nil ?\n)))))
      (rlm--trajectory-insert view "\n"))))

(defun rlm--trajectory-heading (view text)
  "Insert heading TEXT into VIEW's trajectory."
  (rlm--trajectory-fresh-line view)
  (rlm--trajectory-insert view (propertize text 'face 'rlm-heading) "\n"))

(defun rlm--insert-answer (view text &optional face)
  "Insert TEXT into VIEW's answer (at its answer marker) with FACE."
  (rlm--in-view view
    (goto-char (rlm-view-answer-marker view))
    (let ((start (point)))
      (insert (if face (propertize text 'face face) text))
      (unless (eq (char-before) ?\n) (insert "\n"))
      (put-text-property start (point) 'rlm-answer t))))

(defun rlm--view-at-point ()
  "Return the view of the section at point, else the latest one."
  (let ((views (delq nil (mapcar #'rlm-job-view rlm--buffer-jobs)))
        (found nil))
    (dolist (v views)
      (when (<= (rlm-view-section v) (point)) (setq found v)))
    (or found (car (last views)))))

(defun rlm--toggle-view (view)
  "Show or hide VIEW's trajectory, and turn its arrow."
  (let ((ov (rlm-view-overlay view))
        (pos (rlm-view-button view)))
    (overlay-put ov 'invisible (not (overlay-get ov 'invisible)))
    (setf (rlm-view-toggled view) t)
    (rlm--set-arrow view)
    (marker-position pos)))

(defun rlm--set-arrow (view)
  "Make VIEW's arrow say whether its trajectory is shown."
  (let ((pos (rlm-view-button view))
        (shown (not (overlay-get (rlm-view-overlay view) 'invisible))))
    (rlm--in-view view
      (goto-char pos)
      (when (memq (char-after) '(?▾ ?▸))
        (let ((props (text-properties-at (point))))
          (delete-char 1)
          (insert (apply #'propertize (if shown "▾" "▸") props)))))))

(defun rlm-toggle-trajectory ()
  "Show or hide the trajectory of the section at point."
  (interactive)
  (let ((view (and (derived-mode-p 'rlm-result-mode) (rlm--view-at-point))))
    (unless view (user-error "Not in an rlm result buffer"))
    (rlm--toggle-view view)))

(defun rlm-copy-answer ()
  "Copy the answer of the section at point to the kill ring."
  (interactive)
  (let* ((view (rlm--view-at-point))
         (job (cl-find view rlm--buffer-jobs :key #'rlm-job-view))
         (answer (and job (rlm-job-answer job))))
    (unless answer (user-error "No answer yet"))
    (kill-new answer)
    (message "rlm: answer copied")))

;;;; Rendering events

(defun rlm--render-root-delta (job view ev)
  "Show streamed root text EV of JOB in VIEW."
  (let ((text (or (plist-get ev :text) "")))
    ;; The model's text after anything else starts a new turn.
    (unless (equal (rlm-view-last-kind view) "root_delta")
      (cl-incf (rlm-view-turn view))
      (setf (rlm-view-code-in-text view) nil
            (rlm-view-turn-text view) "")
      (rlm--trajectory-heading view (format "Turn %d" (rlm-view-turn view))))
    ;; A fence may arrive split over several deltas.
    (setf (rlm-view-turn-text view) (concat (rlm-view-turn-text view) text))
    (when (string-match-p "^[ \t]*```" (rlm-view-turn-text view))
      (setf (rlm-view-code-in-text view) t))
    (ignore job)
    (rlm--trajectory-insert view (propertize text 'face 'rlm-root-text))))

(defun rlm--render-code (_job view ev)
  "Show the block EV about to run in VIEW."
  (let ((code (or (plist-get ev :code) "")))
    (rlm--trajectory-fresh-line view)
    (rlm--trajectory-insert
     view
     (rlm--indent
      ev (if (and (rlm-view-code-in-text view) (not (plist-get ev :depth)))
             (propertize (format "▶ running the block (%d lines)\n"
                                 (1+ (cl-count ?\n (string-trim code))))
                         'face 'rlm-code)
           (concat (propertize "▶ running:\n" 'face 'rlm-heading)
                   (propertize (string-trim-right code) 'face 'rlm-code) "\n"))))))

(defun rlm--render-output (_job view ev)
  "Show what a block printed (EV) in VIEW."
  (let ((text (string-trim-right (or (plist-get ev :text) ""))))
    (rlm--trajectory-fresh-line view)
    (rlm--trajectory-insert
     view (rlm--indent
           ev (concat (propertize "⇒ output:" 'face 'rlm-heading)
                      (if (string-empty-p text) " (nothing)\n"
                        (concat "\n" (propertize text 'face 'rlm-output) "\n")))))))

(defun rlm--render-subcall (_job view ev)
  "Show the sub-call event EV in VIEW."
  (let* ((status (plist-get ev :status))
         (starting (member status '(nil "start")))
         (elapsed (plist-get ev :elapsed_s)))
    (rlm--trajectory-fresh-line view)
    (rlm--trajectory-insert
     view (rlm--indent
           ev (propertize
               (concat
                (format "↳ %s%s" (or (plist-get ev :fn) "sub-call")
                        (if-let* ((id (plist-get ev :id))) (format " %s" id) ""))
                (if starting
                    (concat
                     (if-let* ((m (plist-get ev :model))) (format " to %s" m) "")
                     (if-let* ((n (plist-get ev :prompt_chars)))
                         (format " (%s chars)" (rlm--format-count n)) ""))
                  (concat (format ": %s" status)
                          (if (numberp elapsed) (format " in %.2f s" elapsed) "")
                          (if-let* ((e (plist-get ev :error))) (format " (%s)" e) "")))
                "\n")
               'face (if (member status '("error" "failed")) 'rlm-error 'rlm-subcall))))))

(defconst rlm--renderers
  '(("root_delta" . rlm--render-root-delta)
    ("code" . rlm--render-code)
    ("output" . rlm--render-output)
    ("subcall" . rlm--render-subcall))
  "How a result buffer shows each event kind; others only change the header.")

(defun rlm--view-event (job ev)
  "Show event EV of JOB in its result buffer."
  (let* ((view (rlm-job-view job))
         (kind (plist-get ev :kind))
         (render (cdr (assoc kind rlm--renderers))))
    (when (and view render) (funcall render job view ev))
    (when (and view (not (member kind '("progress" "phase"))))
      (setf (rlm-view-last-kind view) kind))
    (rlm--refresh-header job)))

(defun rlm--refresh-header (job)
  "Redisplay the header line of JOB's buffer."
  (let ((buf (rlm-job-buffer job)))
    (when (buffer-live-p buf)
      (with-current-buffer buf (force-mode-line-update)))))

(defun rlm--insert-sources (job view)
  "Insert the flags and sources of JOB's answer into VIEW."
  (let ((flags (rlm--flags job))
        (sources (rlm-job-sources job)))
    (when flags
      (rlm--insert-answer
       view
       (concat
        (mapconcat (lambda (f) (propertize (format "[%s]" f) 'face 'rlm-flags)) flags " ")
        (cond ((rlm-job-cached-p job)
               (substitute-command-keys
                "  from the daemon's cache; \\<rlm-result-mode-map>\\[rlm-regenerate] asks again without it"))
              ((rlm-job-best-effort-p job)
               "  a budget (iterations or time) forced this answer")
              (t ""))
        (if (rlm-job-unsupported-p job)
            "\nNo span of the context backs this answer: check it." ""))))
    (when sources
      (rlm--in-view view
        (goto-char (rlm-view-answer-marker view))
        (insert (propertize "Sources:\n" 'face 'rlm-label))
        (let ((i 0))
          (dolist (s sources)
            (cl-incf i)
            (let ((target (rlm-source-location job s)))
              (insert (format "  %d. " i))
              (insert-text-button
               (rlm--source-label s target)
               'rlm-target target 'follow-link t
               'help-echo "Jump to this source"
               'action (lambda (b) (rlm-visit-source (button-get b 'rlm-target))))
              (insert "  " (propertize (rlm--truncate (or (plist-get s :text) "") 70)
                                       'face 'shadow)
                      "\n"))))))))

(defun rlm--source-label (source target)
  "Return the button label of SOURCE, which maps to TARGET."
  (pcase target
    (`(buffer ,buf ,_pos ,label)
     (format "%s%s line %s" (if label (concat label ": ") "")
             (if (buffer-live-p buf) (buffer-name buf) "(killed buffer)")
             (plist-get source :line)))
    (`(file ,file ,line ,_) (format "%s:%s" (abbreviate-file-name file) line))
    (_ (format "line %s" (plist-get source :line)))))

(defun rlm-source-location (job source)
  "Return where SOURCE (a plist of the answer's sources) of JOB lies.
A list (buffer BUFFER POS LABEL), (file FILE LINE CHAR), or nil:
offsets into a context Emacs built map back to the part of the
buffer, region or file they came from."
  (let* ((start (plist-get source :start))
         (parts (rlm-job-parts job))
         (part (and (numberp start)
                    (cl-find-if (lambda (p) (and (<= (plist-get p :offset) start)
                                                 (< start (+ (plist-get p :offset)
                                                             (max 1 (plist-get p :length))))))
                                parts))))
    (cond
     ;; Text Emacs sent from a buffer goes back there, even when it names files
     ;; of its own (a buffer holding joined sources has file headers).
     ((and part (or (plist-get part :buffer) (markerp (plist-get part :start))))
      (let ((base (plist-get part :start)))
        (list 'buffer (if (markerp base) (marker-buffer base) (plist-get part :buffer))
              (+ (if (markerp base) (marker-position base) (or base 1))
                 (- start (plist-get part :offset)))
              (plist-get part :label))))
     ((plist-get source :file)
      (list 'file (expand-file-name (plist-get source :file)
                                    (or (plist-get (car parts) :dir) default-directory))
            (or (plist-get source :file_line) 1) nil))
     ((and part (plist-get part :file))
      (list 'file (plist-get part :file) nil (- start (plist-get part :offset)))))))

(defun rlm-visit-source (target)
  "Show TARGET, a location from `rlm-source-location'."
  (pcase target
    (`(buffer ,buf ,pos ,_)
     (unless (buffer-live-p buf) (user-error "That buffer was killed"))
     (pop-to-buffer buf)
     (goto-char pos))
    (`(file ,file ,line ,char)
     (find-file-other-window file)
     (if line (progn (goto-char (point-min)) (forward-line (1- line)))
       (goto-char (+ (point-min) (or char 0)))))
    (_ (user-error "No location for this source"))))

(defun rlm--view-finish (job)
  "Show the end of JOB in its result buffer."
  (let* ((view (rlm-job-view job))
         (status (rlm-job-state job))
         (message (rlm-job-error job)))
    (when (and view (buffer-live-p (rlm-view-buffer view)))
      (pcase status
        ('done
         (rlm--insert-answer view (rlm-job-answer job))
         (rlm--insert-sources job view))
        ('error
         (rlm--insert-answer view (format "Error: %s" message) 'rlm-error)
         (let ((partial (rlm-job-partial job)))
           (when (and (stringp partial) (not (string-blank-p partial)))
             (rlm--insert-answer view (concat "Partial answer:\n" partial)))))
        ('cancelled
         (rlm--insert-answer view (format "Cancelled%s" (if message (format ": %s" message) ""))
                             'rlm-error)))
      (with-current-buffer (rlm-view-buffer view)
        (let ((ov (rlm-view-overlay view)))
          ;; Fold the trajectory under the answer, unless the user
          ;; chose a state meanwhile.
          (when (and ov (eq status 'done) (not (rlm-view-toggled view)))
            (overlay-put ov 'invisible t)
            (rlm--set-arrow view)))
        (rlm--trajectory-heading
         view (format "End: %s after %.1f s" (rlm--state-text job) (rlm-job-elapsed job)))
        (when-let* ((group (rlm-view-change-group view)))
          ;; One undo step for the whole answer.
          (undo-amalgamate-change-group group)
          (accept-change-group group)
          (setf (rlm-view-change-group view) nil))
        (set-buffer-modified-p nil)
        (force-mode-line-update)))
    (pcase status
      ('error (message "rlm: query failed: %s" (car (split-string (or message "") "\n" t))))
      ('cancelled (message "rlm: query cancelled"))
      ('done
       (with-demoted-errors "rlm: a function of `rlm-query-finished-functions' failed: %S"
         (run-hook-with-args 'rlm-query-finished-functions
                             (rlm-job-answer job) (rlm-job-buffer job)))
       (message "rlm: answered in %.1f s%s" (rlm-job-elapsed job)
                (let ((f (rlm--flags job))) (if f (format " (%s)" (string-join f ", ")) "")))))))

;;;; Starting queries

(cl-defun rlm-start-query (question &key context description options
                                    (display t) callback buffer-name
                                    follow-up result-buffer parts source-buffer)
  "Ask QUESTION of the daemon; return the `rlm-job'.
CONTEXT is the name of a context the daemon holds (nil: none).
DESCRIPTION says what the context is, for the result buffer.
OPTIONS is a plist merged over `rlm-effective-options'.  DISPLAY
non-nil shows the result buffer with `rlm-display-buffer-action'.
CALLBACK, if non-nil, is called with the job when it ends (however
it ends).  BUFFER-NAME overrides the result buffer's name.
FOLLOW-UP is the id of the earlier job this question follows, and
RESULT-BUFFER the conversation's buffer it is appended to.  PARTS
describe how offsets of CONTEXT map back to buffers and files (see
`rlm-source-location'); SOURCE-BUFFER is where the query was asked."
  (let* ((job (rlm-make-job question :context context :description description
                            :options (rlm-effective-options options)
                            :follow-up follow-up :callback callback
                            :parts parts
                            :source-buffer (or source-buffer (current-buffer))))
         (buf (rlm--setup-result-buffer job result-buffer))
         (timer (run-with-timer 1 1 #'rlm--refresh-header job)))
    (when buffer-name
      (with-current-buffer buf (rename-buffer buffer-name t)))
    ;; The timer goes with the job, however it ends.
    (let ((show (rlm-job-on-finish job)))
      (setf (rlm-job-on-finish job)
            (lambda (j) (cancel-timer timer) (funcall show j))))
    (when display (display-buffer buf rlm-display-buffer-action))
    (rlm-run-job job)))

(defun rlm--read-question (&optional prompt)
  "Read a question in the minibuffer with PROMPT."
  (let ((q (read-string (or prompt "Ask rlm: ") nil 'rlm-question-history)))
    (when (string-blank-p q) (user-error "No question"))
    q))

(defun rlm-subtree-bounds ()
  "Return (START END HEADING PART) of the Org subtree at point.
PART is the subtree's stable label: \"#ID\" with an ID property,
else its outline path."
  (require 'org)
  (save-excursion
    (when (org-before-first-heading-p)
      (user-error "Point is before the first heading"))
    (org-back-to-heading t)
    (let* ((start (point))
           (heading (org-get-heading t t t t))
           (id (org-entry-get nil "ID"))
           (part (if (and id (not (string-empty-p id))) (concat "#" id)
                   (string-join (org-get-outline-path t) "/"))))
      (org-end-of-subtree t t)
      (list start (point) heading part))))

(defvar rlm--added-parts)

(defun rlm-target (&optional whole-buffer)
  "Return what a query from here sends, a plist with :kind.
Parts added with `rlm-add' (kind added); else the active region
\(region, with :start :end); else in Org mode the subtree at point
\(subtree, with :start :end :heading :part) unless WHOLE-BUFFER or
before the first heading; else the buffer (buffer)."
  (cond
   (rlm--added-parts (list :kind 'added :parts rlm--added-parts))
   ((use-region-p) (list :kind 'region :start (region-beginning) :end (region-end)))
   ((and (derived-mode-p 'org-mode) (not whole-buffer)
         (progn (require 'org) (not (org-before-first-heading-p))))
    (pcase-let ((`(,start ,end ,heading ,part) (rlm-subtree-bounds)))
      (list :kind 'subtree :start start :end end :heading heading :part part)))
   (t (list :kind 'buffer))))

(defun rlm-target-description (target)
  "Return a description of TARGET (see `rlm-target'), for a prompt."
  (pcase (plist-get target :kind)
    ('added (let ((n (length (plist-get target :parts))))
              (format "%d added part%s" n (if (= n 1) "" "s"))))
    ('region (format "the region (%s chars)"
                     (rlm--format-count (- (plist-get target :end) (plist-get target :start)))))
    ('subtree (format "subtree “%s” (%s chars)" (plist-get target :heading)
                      (rlm--format-count (- (plist-get target :end) (plist-get target :start)))))
    (_ (format "buffer %s (%s chars)" (buffer-name)
               (rlm--format-count (save-restriction (widen) (buffer-size)))))))

(defun rlm--target-prompt (target)
  "Return the question prompt saying what TARGET sends."
  (format "Ask rlm about %s: " (rlm-target-description target)))

(defun rlm--send-target (question target &rest args)
  "Ask QUESTION about TARGET (see `rlm-target'); ARGS go to `rlm-start-query'."
  (let ((desc (format "%s%s" (rlm-target-description target)
                      (if (eq (plist-get target :kind) 'added) ""
                        (format " of %s" (buffer-name))))))
    (pcase (plist-get target :kind)
      ('added
       (pcase-let ((`(,name . ,parts) (rlm--send-added-parts)))
         (apply #'rlm-start-query question :context name :parts parts
                :description desc args)))
      ((and (or 'region 'subtree) kind)
       (let* ((start (plist-get target :start))
              (end (plist-get target :end))
              (name (rlm-buffer-context (current-buffer) start end
                                        (if (eq kind 'subtree) (plist-get target :part)))))
         (prog1 (apply #'rlm-start-query question :context name
                       :parts (list (list :offset 0 :length (- end start)
                                          :start (copy-marker start)))
                       :description desc args)
           ;; What was sent is gone from the screen: no stale region
           ;; goes with the next question.
           (when (eq kind 'region) (deactivate-mark)))))
      (_
       (let ((name (rlm-buffer-context (current-buffer))))
         (apply #'rlm-start-query question :context name
                :parts (list (list :offset 0 :length (save-restriction (widen) (buffer-size))
                                   :start (copy-marker (point-min))))
                :description (format "buffer %s (%s chars)" (buffer-name)
                                     (save-restriction (widen) (buffer-size)))
                args))))))

;;;###autoload
(defun rlm-query (question &optional whole-buffer)
  "Ask QUESTION about the text at hand; return the `rlm-job'.
The context is what `rlm-add' collected, else the active region,
else in Org mode the current subtree (the whole buffer with
WHOLE-BUFFER, interactively a prefix argument, or before the first
heading), else the buffer.  The prompt says which."
  (interactive
   (let ((target (rlm-target current-prefix-arg)))
     (list (rlm--read-question (rlm--target-prompt target)) current-prefix-arg)))
  (rlm--send-target question (rlm-target whole-buffer)))

;;;###autoload
(defun rlm-query-buffer (question &optional buffer)
  "Ask QUESTION about BUFFER (default: the current buffer), all of it."
  (interactive (list (rlm--read-question (rlm--target-prompt '(:kind buffer)))))
  (with-current-buffer (or buffer (current-buffer))
    (rlm--send-target question '(:kind buffer))))

;;;###autoload
(defun rlm-query-region (question start end)
  "Ask QUESTION about the text between START and END."
  (interactive
   (if (use-region-p)
       (list (rlm--read-question
              (rlm--target-prompt (list :kind 'region :start (region-beginning)
                                        :end (region-end))))
             (region-beginning) (region-end))
     (user-error "No active region")))
  (rlm--send-target question (list :kind 'region :start (min start end) :end (max start end))))

;;;###autoload
(defun rlm-query-subtree (question)
  "Ask QUESTION about the Org subtree at point."
  (interactive
   ;; Say what is wrong before asking anything.
   (progn
     (unless (derived-mode-p 'org-mode) (user-error "Not in an Org buffer"))
     (pcase-let ((`(,start ,end ,heading ,part) (rlm-subtree-bounds)))
       (list (rlm--read-question
              (rlm--target-prompt (list :kind 'subtree :start start :end end
                                        :heading heading :part part)))))))
  (unless (derived-mode-p 'org-mode) (user-error "Not in an Org buffer"))
  (pcase-let ((`(,start ,end ,heading ,part) (rlm-subtree-bounds)))
    (rlm--send-target question (list :kind 'subtree :start start :end end
                                     :heading heading :part part))))

(defun rlm--read-files (&optional prompt)
  "Read files or a directory with PROMPT: the marked files in Dired, else one path."
  (if (derived-mode-p 'dired-mode)
      (or (dired-get-marked-files) (user-error "No file here"))
    (let* ((proj (and (fboundp 'project-current) (project-current)))
           (default (if proj (project-root proj) default-directory)))
      (list (read-file-name (or prompt "Ask about file or directory: ") default default t)))))

;;;###autoload
(defun rlm-query-files (question files)
  "Ask QUESTION about FILES, a list of files and directories.
The daemon reads them itself.  Interactively: the marked files in
Dired, else a file or directory read in the minibuffer (default:
the current project)."
  (interactive (let ((files (rlm--read-files))) (list (rlm--read-question) files)))
  (let* ((files (if (listp files) files (list files)))
         (name (rlm-files-context files))
         (dir (and (null (cdr files)) (file-directory-p (car files))
                   (file-name-as-directory (expand-file-name (car files))))))
    (rlm-start-query question :context name
                     :parts (and dir (list (list :offset 0 :length 0 :dir dir)))
                     :description (mapconcat #'abbreviate-file-name files ", "))))

;;;###autoload
(defun rlm-query-context (question name)
  "Ask QUESTION about NAME, a context already stored in the daemon."
  (interactive (let ((name (rlm--read-context "Ask about context: ")))
                 (list (rlm--read-question) name)))
  (rlm-start-query question :context name :description (format "context %s" name)))

(defun rlm--read-context (&optional prompt)
  "Read a context name with completion, using PROMPT."
  (completing-read (or prompt "Context: ") (rlm-context-names) nil t nil
                   'rlm-context-history))

(defvar rlm-context-history nil
  "Minibuffer history of context names.")

;;;; Conversations: follow-ups and regenerating

(defun rlm--last-job ()
  "Return the latest job of this result buffer, or signal."
  (or (and (derived-mode-p 'rlm-result-mode) rlm--job)
      (user-error "Not in an rlm result buffer")))

(defun rlm--ask-again (job question &rest args)
  "Ask QUESTION in JOB's conversation buffer, about JOB's context; ARGS as there."
  (when (rlm-job-running-p job)
    (user-error "The last question is still running (C-c C-k cancels it)"))
  (apply #'rlm-start-query question
         :context (rlm-job-context job) :description (rlm-job-description job)
         :parts (rlm-job-parts job) :source-buffer (rlm-job-source-buffer job)
         :result-buffer (rlm-job-buffer job) :display nil
         (append args (list :options (rlm-job-options job)))))

(defun rlm-follow-up (question)
  "Ask QUESTION as a follow-up of this result buffer's last answer.
The daemon shows the model the earlier questions, answers and
sources; the answer is appended to this buffer."
  (interactive (progn (rlm--last-job) (list (rlm--read-question "Follow-up: "))))
  (let ((job (rlm--last-job)))
    (rlm--ask-again job question :follow-up (rlm-job-id job))))

(defun rlm-regenerate ()
  "Ask the last question of this buffer again, bypassing the daemon's cache."
  (interactive)
  (let ((job (rlm--last-job)))
    (rlm--ask-again job (rlm-job-question job)
                    :follow-up (rlm-job-follow-up job)
                    :options (rlm--merge-plists (rlm-job-options job)
                                                '(:cache :json-false)))))

(defun rlm--revert-regenerates (&rest _)
  "Regenerate the last answer (`revert-buffer' in a result buffer)."
  (rlm-regenerate))

;;;; Several sources in one question: `rlm-add'

(defvar rlm--added-parts nil
  "Parts the next query sends.
Plists with :label and :buffer :start :end (markers) or :file, and
:overlay.")

(defcustom rlm-add-keep nil
  "Non-nil means parts added with `rlm-add' stay for later queries.
nil: the next query sends them and forgets them."
  :type 'boolean
  :group 'rlm)

;;;###autoload
(defun rlm-add (&optional file)
  "Add a part to the next query: the region, else the buffer.
In Dired, the marked files.  With FILE (interactively a prefix
argument, read in the minibuffer), that file.  The next query
sends the parts as one context, each under a header, and its
sources point back into the parts."
  (interactive (list (and current-prefix-arg (read-file-name "Add file: " nil nil t))))
  (cond
   (file (rlm--add-part (list :label (abbreviate-file-name file)
                              :file (expand-file-name file))))
   ((derived-mode-p 'dired-mode)
    (dolist (f (dired-get-marked-files))
      (rlm--add-part (list :label (abbreviate-file-name f) :file f))))
   ((use-region-p)
    (let* ((start (copy-marker (region-beginning)))
           (end (copy-marker (region-end) t))
           (ov (make-overlay start end nil t nil)))
      (overlay-put ov 'face 'rlm-added)
      (overlay-put ov 'rlm-added t)
      (rlm--add-part (list :label (format "region of %s, line %d" (buffer-name)
                                          (line-number-at-pos start))
                           :buffer (current-buffer) :start start :end end :overlay ov))
      (deactivate-mark)))
   (t (rlm--add-part (list :label (format "buffer %s" (buffer-name))
                           :buffer (current-buffer)))))
  (message "rlm: %d part%s for the next query (%s clears)" (length rlm--added-parts)
           (if (cdr rlm--added-parts) "s" "")
           (substitute-command-keys "\\[rlm-add-clear]"))
  rlm--added-parts)

(defun rlm--add-part (part)
  "Append PART to `rlm--added-parts'."
  (setq rlm--added-parts (append rlm--added-parts (list part))))

(defun rlm-add-clear ()
  "Forget the parts added with `rlm-add'."
  (interactive)
  (dolist (p rlm--added-parts)
    (when (plist-get p :overlay) (delete-overlay (plist-get p :overlay))))
  (setq rlm--added-parts nil))

(defun rlm--part-text (part)
  "Return (TEXT . START-MARKER-OR-NIL) of PART."
  (cond
   ((plist-get part :file)
    (with-temp-buffer
      (insert-file-contents (plist-get part :file))
      (cons (buffer-string) nil)))
   ((not (buffer-live-p (plist-get part :buffer)))
    (rlm--signal "the buffer of the part “%s” was killed" (plist-get part :label)))
   (t
    (with-current-buffer (plist-get part :buffer)
      (save-restriction
        (widen)
        (let ((start (or (plist-get part :start) (point-min)))
              (end (or (plist-get part :end) (point-max))))
          (cons (buffer-substring-no-properties start end) (copy-marker start))))))))

(defun rlm--send-added-parts ()
  "Send the added parts as one context; return (NAME . PARTS).
Each part is under a header line; PARTS say where each one's text
starts in the context, for `rlm-source-location'."
  (let ((chunks nil) (parts nil) (offset 0) (i 0)
        (n (length rlm--added-parts)))
    (dolist (p rlm--added-parts)
      (cl-incf i)
      (pcase-let* ((`(,text . ,start) (rlm--part-text p))
                   (header (format "===== Part %d of %d: %s =====\n" i n (plist-get p :label))))
        (push header chunks)
        (cl-incf offset (length header))
        (push (rlm--plist :offset offset :length (length text) :label (plist-get p :label)
                          :start start :file (plist-get p :file))
              parts)
        (push text chunks)
        (push "\n\n" chunks)
        (cl-incf offset (+ (length text) 2))))
    (let ((name "emacs:added"))
      (rlm-put-text name (apply #'concat (nreverse chunks)))
      (unless rlm-add-keep (rlm-add-clear))
      (cons name (nreverse parts)))))

;;;; Answer at point

;;;###autoload
(defun rlm-query-insert (question &optional whole-buffer target)
  "Ask QUESTION as `rlm-query' does; insert the answer at point.
The answer goes where point was when you asked (after the region,
when one was sent), as one undo step; point does not move.  The
trajectory is kept aside in the result buffer.  WHOLE-BUFFER is as
in `rlm-query'; TARGET, from `rlm-target', overrides the choice."
  (interactive
   (let ((target (rlm-target current-prefix-arg)))
     (list (rlm--read-question (rlm--target-prompt target)) current-prefix-arg)))
  (let* ((target (or target (rlm-target whole-buffer)))
         (marker (copy-marker (if (eq (plist-get target :kind) 'region)
                                  (plist-get target :end)
                                (point))))
         (job (rlm--send-target question target :display nil
                                :callback (lambda (job) (rlm--insert-at-marker job marker)))))
    (message "rlm: the answer will be inserted here (%s cancels)"
             (substitute-command-keys "\\[rlm-cancel]"))
    job))

(defun rlm--insert-at-marker (job marker)
  "Insert JOB's answer at MARKER as one undo step, if JOB succeeded."
  (let ((buf (marker-buffer marker)))
    (when (and (eq (rlm-job-state job) 'done) (buffer-live-p buf))
      (with-current-buffer buf
        (let ((group (prepare-change-group)))
          (activate-change-group group)
          (unwind-protect
              (save-excursion
                (goto-char marker)
                (insert (rlm-job-answer job)))
            (undo-amalgamate-change-group group)
            (accept-change-group group)))))
    (set-marker marker nil)))

;;;; Synchronous use

(defun rlm-query-sync (question &rest args)
  "Ask QUESTION and wait for the answer; return it as a string.
ARGS are those of `rlm-start-query' plus :text (a string to ask about)
and :timeout (seconds, default none).  Signals `rlm-error' when the
query fails or is cancelled; \\[keyboard-quit] cancels it."
  (let* ((text (plist-get args :text))
         (timeout (plist-get args :timeout))
         (start-args (rlm--plist-without args '(:text :timeout)))
         (context (or (plist-get start-args :context)
                      (and text (rlm--text-context text))))
         (job (apply #'rlm-start-query question
                     (append (list :context context :display nil)
                             (rlm--plist-without start-args '(:context :display))))))
    (rlm-wait job timeout)
    (pcase (rlm-job-state job)
      ('done (rlm-job-answer job))
      ('cancelled (rlm--signal "query cancelled%s"
                               (if (rlm-job-error job) (format " (%s)" (rlm-job-error job)) "")))
      (_ (rlm--signal "query failed: %s" (rlm-job-error job))))))

(defun rlm--text-context (text)
  "Store TEXT as a context named by its hash; return the name."
  (let ((name (concat "text:" (substring (secure-hash 'sha1 text) 0 16))))
    (unless (rlm--context-exists-p name)
      (rlm-put-text name text))
    name))

;;;; Cancel

;;;###autoload
(defun rlm-cancel (&optional job)
  "Cancel JOB: this result buffer's query, else the query asked from this buffer.
Else a running query chosen in the minibuffer (newest first)."
  (interactive)
  (let* ((running (rlm--running-jobs))
         (job (or job
                  (and (derived-mode-p 'rlm-result-mode) rlm--job
                       (rlm-job-running-p rlm--job) rlm--job)
                  (cl-find (current-buffer) running :key #'rlm-job-source-buffer)
                  (cond
                   ((null running) (user-error "No rlm query is running"))
                   ((null (cdr running)) (car running))
                   (t (rlm-read-job "Cancel query: " running))))))
    (if (and (rlm-job-p job) (rlm-job-running-p job))
        (rlm-cancel-job job)
      (message "rlm: that query already ended"))))

(defun rlm-cancel-or-quit ()
  "Quit; if this buffer's query is running, offer to cancel it.
A reflexive \\[keyboard-quit] never kills a long query: it asks first."
  (interactive)
  (if (and rlm--job (rlm-job-running-p rlm--job))
      (if (y-or-n-p "Cancel the running rlm query? ")
          (rlm-cancel-job rlm--job "quit")
        (deactivate-mark)
        (message "rlm: the query goes on (%s cancels it)"
                 (substitute-command-keys "\\<rlm-result-mode-map>\\[rlm-cancel]")))
    (keyboard-quit)))

;;;; Diff review

(defvar-local rlm--diff-source nil
  "The buffer holding the diff a review refers to.")

(defun rlm--diff-files (diff-buffer)
  "Return the file names (new side) in the unified diff of DIFF-BUFFER."
  (with-current-buffer diff-buffer
    (save-excursion
      (goto-char (point-min))
      (let (files)
        (while (re-search-forward "^\\+\\+\\+ \\(?:b/\\)?\\([^\t\n]+\\)" nil t)
          (unless (equal (match-string 1) "/dev/null")
            (push (match-string-no-properties 1) files)))
        (nreverse files)))))

(defun rlm-diff-line-position (diff-buffer file line)
  "Return the position in DIFF-BUFFER of new-file LINE of FILE.
LINE is a line of the new version; when no hunk covers it, return
the position of FILE's header, and nil when FILE is not in the diff."
  (with-current-buffer diff-buffer
    (save-excursion
      (goto-char (point-min))
      (when (re-search-forward
             (concat "^\\+\\+\\+ \\(?:b/\\)?" (regexp-quote file) "\\(?:\t.*\\)?$") nil t)
        (let ((header (line-beginning-position))
              (limit (save-excursion
                       (if (re-search-forward "^\\(?:diff \\|--- \\)" nil t)
                           (line-beginning-position) (point-max))))
              found)
          (while (and (not found)
                      (re-search-forward "^@@ -[0-9,]+ \\+\\([0-9]+\\)\\(?:,\\([0-9]+\\)\\)? @@"
                                         limit t))
            (let ((new (string-to-number (match-string 1))))
              (forward-line 1)
              (while (and (not found) (< (point) limit)
                          (not (looking-at "^@@")))
                (let ((c (char-after)))
                  (cond ((memq c '(?\s ?+))
                         (if (= new line) (setq found (point))
                           (setq new (1+ new))))
                        ((eq c ?-) nil)))
                (unless found (forward-line 1)))))
          (or found header))))))

(defun rlm--link-references (job diff-buffer)
  "Make the path:line references in JOB's answer buttons into DIFF-BUFFER."
  (let ((files (rlm--diff-files diff-buffer))
        (buf (rlm-job-buffer job)))
    (when (and files (buffer-live-p buf))
      (with-current-buffer buf
        (setq rlm--diff-source diff-buffer)
        (let ((inhibit-read-only t))
          (save-excursion
            (goto-char (point-min))
            (while (re-search-forward
                    "\\(?:[ab]/\\)?\\([[:alnum:]_.][[:alnum:]_./+-]*\\):\\([0-9]+\\)" nil t)
              (let* ((ref (match-string-no-properties 1))
                     (line (string-to-number (match-string 2)))
                     (file (or (car (member ref files))
                               (cl-find-if (lambda (f) (string-suffix-p (concat "/" ref) f))
                                           files))))
                (when (and file (get-text-property (match-beginning 0) 'rlm-answer))
                  (make-text-button (match-beginning 0) (match-end 0)
                                    'rlm-file file 'rlm-line line
                                    'rlm-diff diff-buffer
                                    'help-echo (format "Jump to %s:%d in the diff" file line)
                                    'action #'rlm--jump-to-reference))))))))))

(defun rlm--jump-to-reference (button)
  "Show the diff line BUTTON refers to."
  (let ((diff (button-get button 'rlm-diff)))
    (unless (buffer-live-p diff) (user-error "The diff buffer is gone"))
    (let ((pos (rlm-diff-line-position diff (button-get button 'rlm-file)
                                       (button-get button 'rlm-line))))
      (pop-to-buffer diff)
      (when pos (goto-char pos)))))

(defun rlm-review (diff-buffer &optional description question)
  "Review the unified diff in DIFF-BUFFER; return the `rlm-job'.
DESCRIPTION names the diff in the result buffer; QUESTION defaults
to `rlm-review-question'.  When the review arrives, its path:line
references become buttons that jump to the diff."
  (let* ((name (rlm-buffer-context diff-buffer)))
    (rlm-start-query (or question rlm-review-question)
                     :context name
                     :description (or description (format "diff %s" (buffer-name diff-buffer)))
                     :buffer-name (format "*rlm review: %s*" (or description (buffer-name diff-buffer)))
                     :callback (lambda (job)
                                 (when (eq (rlm-job-state job) 'done)
                                   (rlm--link-references job diff-buffer))))))

;;;###autoload
(defun rlm-review-diff (&optional question)
  "Review the diff in this `diff-mode' buffer.
With a prefix argument, read the QUESTION instead of using
`rlm-review-question'."
  (interactive (list (and current-prefix-arg (rlm--read-question))))
  (unless (derived-mode-p 'diff-mode) (user-error "Not in a diff buffer"))
  (rlm-review (current-buffer) nil question))

(provide 'rlm)
;;; rlm.el ends here
